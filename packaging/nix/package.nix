# nixd as a nixpkgs Python application, built from this repository's source with the
# Python packages nixpkgs has. The dependency list is read from pyproject.toml by
# ./python-deps.nix, so this file never has to follow a change of dependencies by hand.
#
#   pkgs.callPackage ./packaging/nix/package.nix { }     # what the flake does per system
{
  lib,
  stdenv,
  python3Packages,
  # optional-dependency groups of pyproject.toml to include; "aws" is what `nixd login
  # aws` needs (a group pyproject does not have is skipped)
  extras ? [ "aws" ],
}:
let
  root = ../..;
  pyproject = lib.importTOML (root + "/pyproject.toml");
  deps = import ./python-deps.nix {
    inherit pyproject extras;
    platform = if stdenv.hostPlatform.isDarwin then "darwin" else "linux";
  };
  pick =
    dep:
    let
      found = lib.findFirst (attr: python3Packages ? ${attr}) null dep.candidates;
    in
    if found == null then
      throw "nixd: nixpkgs has no Python package ${lib.concatStringsSep " or " dep.candidates} (for ${dep.name})"
    else
      python3Packages.${found};
  # `pyjwt[crypto]`: the package and what its extra needs, as nixpkgs lists them
  withExtras =
    dep:
    let
      package = pick dep;
    in
    [ package ] ++ lib.concatMap (extra: package.optional-dependencies.${extra} or [ ]) dep.extras;
in
python3Packages.buildPythonApplication {
  pname = pyproject.project.name;
  inherit (pyproject.project) version;
  pyproject = true;

  # only what the wheel is built from: an edit to tests/ or packaging/ rebuilds nothing
  src = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.unions [
      (root + "/nixd")
      (root + "/pyproject.toml")
      (root + "/README.md")
      (root + "/LICENSE")
    ];
  };

  build-system = [ python3Packages.setuptools ];
  dependencies = lib.unique (lib.concatMap withExtras deps);
  # pyproject's lower bounds are for pip; a nixpkgs set is tested together as it is
  pythonRelaxDeps = true;

  pythonImportsCheck = [
    "nixd.cli"
    "nixd.server.cli"
  ];
  # The test suite drives the real nix as root with loopback servers (scripts/test); it
  # cannot run in the build sandbox. The import check above and `--version` below can.
  doCheck = false;
  doInstallCheck = true;
  installCheckPhase = ''
    runHook preInstallCheck
    $out/bin/nixd --version
    $out/bin/nixd-server --version
    runHook postInstallCheck
  '';

  meta = {
    description = pyproject.project.description;
    license = lib.licenses.mit;
    mainProgram = "nixd";
    platforms = lib.platforms.linux ++ lib.platforms.darwin;
  };
}
