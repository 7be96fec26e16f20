# TOML text from an attribute set, with builtins only: the NixOS and nix-darwin modules
# render /etc/nixd/config.toml (and nixd-server's config.toml) with it, and the tests
# evaluate it with a bare `nix eval`, without nixpkgs, and load what it prints with nixd's
# own config parsers.
#
# The model: the attribute set is the document. In every table, keys whose values are
# scalars or lists of scalars come first as `key = value` lines; attribute sets become
# `[sub.tables]`; non-empty lists of attribute sets become `[[arrays.of.tables]]`. A null
# value is left out, so an option left at null means "nixd's default". Keys print bare
# when TOML allows it and quoted otherwise; strings are TOML basic strings with every
# control character escaped. A path or a derivation prints as its path.
#
# Floats print exactly or not at all: Nix 2.8 prints a float with six significant digits
# (toJSON) or six decimals (toString), so a float that neither reads back as itself is an
# error, never a silently different number in the config.
let
  inherit (builtins)
    all
    any
    attrNames
    concatLists
    concatStringsSep
    filter
    fromJSON
    genList
    isAttrs
    isBool
    isFloat
    isInt
    isList
    isPath
    isString
    length
    match
    replaceStrings
    substring
    toJSON
    typeOf
    ;

  hexDigits = "0123456789ABCDEF";
  hex2 = n: substring (n / 16) 1 hexDigits + substring (n - n / 16 * 16) 1 hexDigits;
  # U+0001..U+001F and U+007F (a Nix string cannot hold U+0000); TOML forbids them raw.
  controlCodes = genList (i: i + 1) 31 ++ [ 127 ];
  shortEscapes = {
    "8" = "\\b";
    "9" = "\\t";
    "10" = "\\n";
    "12" = "\\f";
    "13" = "\\r";
  };
  charOf = n: fromJSON "\"\\u00${hex2 n}\"";
  escapeOf = n: shortEscapes.${toString n} or "\\u00${hex2 n}";

  quote =
    s:
    "\""
    + replaceStrings ([ "\\" "\"" ] ++ map charOf controlCodes) (
      [ "\\\\" "\\\"" ] ++ map escapeOf controlCodes
    ) s
    + "\"";

  renderKey = k: if match "[A-Za-z0-9_-]+" k != null then k else quote k;
  dotted = path: concatStringsSep "." (map renderKey path);
  where = path: if path == [ ] then "the top level" else dotted path;

  isPathLike = v: isPath v || (isAttrs v && v ? outPath);
  isTable = v: isAttrs v && !(v ? outPath);
  isTableList = v: isList v && v != [ ] && all isTable v;

  renderFloat =
    path: x:
    let
      viaJSON = toJSON x;
      viaString = toString x;
      # "10" from toJSON is an integer in TOML: make it a float again
      asFloat = s: if match "-?[0-9]+" s != null then s + ".0" else s;
    in
    if fromJSON viaJSON == x then
      asFloat viaJSON
    else if fromJSON viaString == x then
      viaString
    else
      throw "${where path}: the float ${viaString} cannot be written exactly (Nix prints six digits); use fewer digits";

  renderValue =
    path: v:
    if isString v then
      quote v
    else if isPathLike v then
      quote (toString v)
    else if isBool v then
      (if v then "true" else "false")
    else if isInt v then
      toString v
    else if isFloat v then
      renderFloat path v
    else if isList v then
      if any (e: e == null) v then
        throw "${where path}: a list cannot hold null in TOML"
      else if any isTable v then
        throw "${where path}: a list mixes tables with other values"
      else
        "[" + concatStringsSep ", " (map (renderValue path) v) + "]"
    else
      throw "${where path}: cannot write a ${typeOf v} as TOML";

  # The blocks (header + key lines) of the table at `path`, then of its sub-tables.
  # `header` is null for the document itself; `always` keeps the header of a table with
  # no keys of its own (an element of an array of tables must appear to exist).
  blocks =
    header: always: path: attrs:
    let
      names = filter (k: attrs.${k} != null) (attrNames attrs);
      plain = filter (k: !isTable attrs.${k} && !isTableList attrs.${k}) names;
      tables = filter (k: isTable attrs.${k}) names;
      arrays = filter (k: isTableList attrs.${k}) names;
      lines = map (k: "${renderKey k} = ${renderValue (path ++ [ k ]) attrs.${k}}") plain;
      empty = tables == [ ] && arrays == [ ];
      own =
        if header == null then
          (if lines == [ ] then [ ] else [ (concatStringsSep "\n" lines) ])
        else if lines != [ ] || always || empty then
          [ (concatStringsSep "\n" ([ header ] ++ lines)) ]
        else
          [ ];
      sub = concatLists (
        map (k: blocks "[${dotted (path ++ [ k ])}]" false (path ++ [ k ]) attrs.${k}) tables
      );
      arr = concatLists (
        map (
          k:
          concatLists (
            map (t: blocks "[[${dotted (path ++ [ k ])}]]" true (path ++ [ k ]) t) attrs.${k}
          )
        ) arrays
      );
    in
    own ++ sub ++ arr;
in
settings:
if !isTable settings then
  throw "render.nix: the settings must be an attribute set, not a ${typeOf settings}"
else
  let
    all' = blocks null false [ ] settings;
  in
  if length all' == 0 then "" else concatStringsSep "\n\n" all' + "\n"
