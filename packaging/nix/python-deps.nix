# nixd's Python dependencies as nixpkgs attribute names, read from pyproject.toml, so the
# flake's package always asks for what pip installs. Pure builtins (the tests evaluate it
# against the real pyproject.toml with a bare `nix eval`, without nixpkgs).
#
# Each requirement string (PEP 508) gives a distribution name, optional extras and an
# optional environment marker. Names map to nixpkgs attributes through `nixpkgsNames`,
# a list of candidates each, the first one nixpkgs has winning (nixpkgs renames packages
# now and then). A marker may test sys_platform or platform_system with == or !=; anything
# else, and any name missing from the table, stops evaluation with a message saying
# where to add it, rather than building a package that fails at run time.
{
  pyproject,
  # "linux" or "darwin" (sys_platform's words)
  platform,
  # optional-dependency groups of pyproject to include (missing groups are skipped)
  extras ? [ ],
}:
let
  inherit (builtins)
    concatLists
    elemAt
    filter
    head
    length
    map
    match
    replaceStrings
    genList
    stringLength
    substring
    ;

  # PyPI name (normalized, PEP 503) -> nixpkgs python3Packages attribute candidates
  nixpkgsNames = {
    botocore = [ "botocore" ];
    brotli = [ "brotli" ];
    cryptography = [ "cryptography" ];
    h11 = [ "h11" ];
    httpx = [ "httpx" ];
    hypercorn = [ "hypercorn" ];
    jeepney = [ "jeepney" ];
    lz4 = [ "lz4" ];
    prometheus-client = [ "prometheus-client" ];
    psycopg = [ "psycopg" ];
    pyjwt = [ "pyjwt" ];
    segno = [ "segno" ];
    starlette = [ "starlette" ];
    systemd-python = [
      "systemd-python"
      "systemd"
    ];
    trio = [ "trio" ];
    watchfiles = [ "watchfiles" ];
    zstandard = [ "zstandard" ];
  };

  platformSystem = {
    linux = "Linux";
    darwin = "Darwin";
  };

  characters = s: genList (i: substring i 1 s) (stringLength s);
  upper = characters "ABCDEFGHIJKLMNOPQRSTUVWXYZ_.";
  lower = characters "abcdefghijklmnopqrstuvwxyz--";
  normalize = name: replaceStrings upper lower name;

  markerHolds =
    requirement: marker:
    let
      m = match "[[:space:]]*(sys_platform|platform_system)[[:space:]]*(==|!=)[[:space:]]*['\"]([^'\"]*)['\"][[:space:]]*" marker;
      variable = elemAt m 0;
      actual = if variable == "sys_platform" then platform else platformSystem.${platform};
      equal = actual == elemAt m 2;
    in
    if m == null then
      throw "packaging/nix/python-deps.nix: cannot evaluate the marker of `${requirement}`; teach markerHolds about it"
    else if elemAt m 1 == "==" then
      equal
    else
      !equal;

  parse =
    requirement:
    let
      m = match "[[:space:]]*([A-Za-z0-9][A-Za-z0-9._-]*)[[:space:]]*(\\[([^]]*)])?[^;]*(;(.*))?" requirement;
      name = normalize (elemAt m 0);
      extrasText = elemAt m 2;
      marker = elemAt m 4;
    in
    if m == null then
      throw "packaging/nix/python-deps.nix: cannot read the requirement `${requirement}`"
    else
      {
        inherit name requirement;
        extras =
          if extrasText == null then
            [ ]
          else
            map normalize (filter (e: e != "") (builtins.split "[[:space:],]+" extrasText));
        wanted = marker == null || markerHolds requirement marker;
      };

  project = pyproject.project;
  groups = project.optional-dependencies or { };
  requirements =
    project.dependencies or [ ]
    ++ concatLists (map (group: groups.${group} or [ ]) extras);

  wanted = filter (r: r.wanted) (map parse requirements);

  attrsOf =
    r:
    nixpkgsNames.${r.name}
      or (throw "packaging/nix/python-deps.nix: no nixpkgs name for the Python dependency `${r.name}` (from `${r.requirement}`); add it to nixpkgsNames");
in
# [{ name; candidates = [attr...]; extras = [extra...]; }]
map (r: {
  inherit (r) name extras;
  candidates = attrsOf r;
}) wanted
