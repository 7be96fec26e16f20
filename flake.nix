{
  # nixd: the package, a NixOS module (services.nixd, services.nixd-server) and a
  # nix-darwin module (services.nixd). The pieces live in packaging/nix/ and work without
  # flakes too: `pkgs.callPackage ./packaging/nix/package.nix { }`, and
  # `imports = [ ./packaging/nix/nixos.nix ]` (or darwin.nix).
  #
  #   nix build github:OWNER/nixd          nix profile install github:OWNER/nixd
  #   nix run github:OWNER/nixd -- status
  #
  # Note: nixpkgs has an unrelated package named `nixd` (a Nix language server); this
  # flake's outputs are its own and shadow nothing (there is no overlay).
  description = "nixd: identity-aware Nix binary cache daemon, verifying local proxy substituter, and cache server";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
        "x86_64-darwin"
        "aarch64-darwin"
      ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      # the modules default to this flake's package for the machine's system
      withPackage =
        module:
        { pkgs, lib, ... }:
        {
          imports = [ module ];
          config.services.nixd.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        };
    in
    {
      packages = forAllSystems (pkgs: rec {
        nixd = pkgs.callPackage ./packaging/nix/package.nix { };
        default = nixd;
      });

      nixosModules = rec {
        nixd =
          { pkgs, lib, ... }:
          {
            imports = [ (withPackage ./packaging/nix/nixos.nix) ];
            config.services.nixd-server.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
          };
        default = nixd;
      };

      darwinModules = rec {
        nixd = withPackage ./packaging/nix/darwin.nix;
        default = nixd;
      };
    };
}
