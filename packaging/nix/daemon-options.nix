# The options of `services.nixd`, shared by the NixOS and the nix-darwin module.
{ lib, pkgs }:
let
  units = import ./units.nix;
  defaultPackage = pkgs.callPackage ./package.nix { };
  settingsType = lib.types.attrsOf lib.types.anything;
  # a config section: a few typed keys, any other key nixd knows besides
  section =
    options:
    lib.mkOption {
      type = lib.types.submodule {
        freeformType = settingsType;
        inherit options;
      };
      default = { };
      description = "This section of the config: the keys declared here, and any other key nixd knows.";
    };
in
{
  enable = lib.mkEnableOption "nixd, the identity-aware Nix binary cache daemon and its local verifying proxy substituter";

  package = lib.mkOption {
    type = lib.types.package;
    default = defaultPackage;
    defaultText = lib.literalExpression "pkgs.callPackage <nixd>/packaging/nix/package.nix { }";
    description = "The nixd package (its `nixd` runs the daemon).";
  };

  settings = lib.mkOption {
    type = lib.types.submodule {
      freeformType = settingsType;
      options = {
        server = section {
          url = lib.mkOption {
            type = lib.types.nullOr lib.types.str;
            default = null;
            example = "https://cache.example.org";
            description = "The nixd cache server logged in to (null: given at `nixd login --server`).";
          };
        };
        proxy = section {
          listen = lib.mkOption {
            type = lib.types.str;
            default = units.defaultProxyListen;
            description = "HOST:PORT of the local proxy substituter; the socket unit listens there.";
          };
          upstreams = lib.mkOption {
            type = lib.types.listOf settingsType;
            default = [ ];
            example = lib.literalExpression ''
              [ { url = "https://cache.nixos.org"; priority = 40;
                  trusted_keys = [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ]; } ]
            '';
            description = "Further caches the proxy asks (`[[proxy.upstreams]]`: url, priority, trusted_keys, auth, netrc_file, foreign_urls).";
          };
        };
        nix = section {
          fragment = lib.mkOption {
            type = lib.types.str;
            default = "/etc/nix/nixd.conf";
            description = "The nix.conf fragment nixd writes (substituter, keys, netrc-file); nix.conf includes it.";
          };
        };
      };
    };
    default = { };
    example = lib.literalExpression ''
      {
        server.url = "https://cache.example.org";
        daemon.control_group = "wheel";   # members may run `nixd login` / `logout`
      }
    '';
    description = ''
      /etc/nixd/config.toml as an attribute set: sections daemon, server, proxy and nix,
      with the keys nixd documents (an unknown key stops the daemon's start with its
      name). A null value leaves the key at nixd's default.
    '';
  };

  login = {
    method = lib.mkOption {
      type = lib.types.nullOr (
        lib.types.enum [
          "token"
          "aws"
        ]
      );
      default = null;
      description = ''
        Log the machine in when nixd starts: "token" (an API token from `tokenFile`) or
        "aws" (the machine's own AWS identity). null: log in by hand (`sudo nixd login`).
      '';
    };
    tokenFile = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "/run/secrets/nixd-token";
      description = "File holding the API token for method \"token\" (a path outside the store).";
    };
    extraArgs = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [
        "--region"
        "eu-west-1"
      ];
      description = "More arguments for `nixd login METHOD` (e.g. --server, --profile, --region).";
    };
  };
}
