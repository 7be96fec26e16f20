# The service definitions the NixOS and nix-darwin modules install, made from the files
# Debian and macOS users install (systemd/*.service, *.socket; launchd/*.plist), so a
# machine run by a module runs the same unit as one set up by packaging/install.sh.
#
# The systemd files are read and parsed here (sections, `Key=value` lines, repeated keys
# kept in order); only two things change on NixOS: the program (the package's bin/nixd
# instead of /usr/local/bin/nixd) and /bin/kill (absent on NixOS). The cache server's
# unit also takes the module's state directory, user and listen addresses. The launchd dictionary
# is written out (no XML parser in builtins); a test compares it with the shipped plist.
# Pure builtins: the tests evaluate everything here with a bare `nix eval`.
let
  inherit (builtins)
    attrNames
    concatStringsSep
    elemAt
    filter
    foldl'
    head
    isString
    length
    listToAttrs
    match
    readFile
    removeAttrs
    split
    substring
    stringLength
    tail
    ;

  systemdDir = ../../systemd;

  words = value: filter (w: isString w && w != "") (split "[[:space:]]+" value);
  trim =
    s:
    let
      m = match "[[:space:]]*(.*[^[:space:]])[[:space:]]*" s;
    in
    if m == null then "" else head m;

  # "[Section]" and "Key=value" lines into { Section = { Key = [ value ... ]; }; }
  parseUnit =
    name: text:
    let
      step =
        acc: raw:
        let
          line = trim raw;
          section = match "\\[([A-Za-z]+)]" line;
          entry = match "([A-Za-z0-9]+)[[:space:]]*=[[:space:]]*(.*)" line;
          key = elemAt entry 0;
          value = elemAt entry 1;
          current = acc.sections.${acc.section} or { };
        in
        if line == "" || match "[#;].*" line != null then
          acc
        else if match ".*\\\\" line != null then
          throw "${name}: continued lines are not supported here: ${line}"
        else if section != null then
          acc // { section = head section; }
        else if entry != null && acc.section != null then
          acc
          // {
            sections = acc.sections // {
              ${acc.section} = current // {
                ${key} = (current.${key} or [ ]) ++ [ value ];
              };
            };
          }
        else
          throw "${name}: cannot read the line `${line}`";
      parsed = foldl' step {
        section = null;
        sections = { };
      } (filter isString (split "\n" text));
    in
    parsed.sections;

  readUnit = file: parseUnit file (readFile (systemdDir + "/${file}"));

  # one value: a string; a repeated key: the list, each becomes its own line again
  flatten = values: if length values == 1 then head values else values;
  flattenAll = attrs: listToAttrs (map (k: {
    name = k;
    value = flatten attrs.${k};
  }) (attrNames attrs));
  wordsOf = section: key: foldl' (acc: v: acc ++ words v) [ ] (section.${key} or [ ]);

  unitKeys = [
    "Description"
    "After"
    "Wants"
    "Before"
    "Requires"
  ];
  unitPart =
    unit:
    let
      u = unit.Unit or { };
    in
    {
      description = flatten (u.Description or [ "" ]);
      after = wordsOf u "After";
      wants = wordsOf u "Wants";
      before = wordsOf u "Before";
      requires = wordsOf u "Requires";
      wantedBy = wordsOf (unit.Install or { }) "WantedBy";
      unitConfig = flattenAll (removeAttrs u unitKeys);
    };

  replacePrefix =
    old: new: s:
    if substring 0 (stringLength old) s == old then
      new + substring (stringLength old) (stringLength s) s
    else
      s;

  # ExecStart's program becomes `nixd` (the package's), the rest of the line stays
  execWith =
    nixd: line:
    let
      w = words line;
    in
    if w == [ ] || match ".*/nixd" (head w) == null then
      throw "systemd/nixd.service: ExecStart does not run a nixd binary: ${line}"
    else
      concatStringsSep " " ([ nixd ] ++ tail w);

  splitListen =
    listen:
    let
      m = match "\\[?([^]]*[^]:]|[^:]+)]?:([0-9]+)" listen;
    in
    if m == null then
      throw "nixd: a listen address is HOST:PORT or [V6]:PORT, not `${listen}`"
    else
      {
        host = elemAt m 0;
        port = elemAt m 1;
      };

  serviceUnit = readUnit "nixd.service";
  controlUnit = readUnit "nixd.socket";
  proxyUnit = readUnit "nixd-proxy.socket";
  serverUnit = readUnit "nixd-server.service";
  serverSocketUnit = readUnit "nixd-server.socket";

  socketFrom = unit: listen: {
    inherit (unitPart unit)
      description
      wantedBy
      after
      before
      requires
      wants
      unitConfig
      ;
    listenStreams =
      if listen == null then
        unit.Socket.ListenStream
      else if isString listen then
        [ listen ]
      else
        listen;
    socketConfig = flattenAll (removeAttrs unit.Socket [ "ListenStream" ]);
  };
in
{
  inherit parseUnit splitListen;

  # the proxy's address the shipped socket unit listens on (= nixd's default)
  defaultProxyListen = head proxyUnit.Socket.ListenStream;
  # ExecStart's --config
  configFile =
    let
      m = match ".* --config ([^ ]+).*" (head serviceUnit.Service.ExecStart);
    in
    if m == null then "/etc/nixd/config.toml" else head m;

  # systemd.services / systemd.sockets for NixOS
  systemd =
    {
      nixd,
      kill,
      proxyListen ? null,
    }:
    {
      services.nixd = unitPart serviceUnit // {
        serviceConfig = flattenAll (
          serviceUnit.Service
          // {
            ExecStart = map (execWith nixd) serviceUnit.Service.ExecStart;
            ExecReload = map (replacePrefix "/bin/kill " "${kill} ") (serviceUnit.Service.ExecReload or [ ]);
          }
        );
      };
      sockets.nixd = socketFrom controlUnit null;
      sockets.nixd-proxy = socketFrom proxyUnit proxyListen;
    };

  # systemd.services.nixd-server and its socket for NixOS: the shipped units, with the
  # module's command line (`execStart`, already quoted for systemd), user and group, and
  # `stateDir` made writable in place of the shipped StateDirectory= (it may be anywhere;
  # the module makes it with tmpfiles)
  server =
    {
      execStart,
      stateDir,
      user,
      group,
      listen,
    }:
    {
      services.nixd-server = unitPart serverUnit // {
        serviceConfig = flattenAll (
          removeAttrs serverUnit.Service [
            "StateDirectory"
            "StateDirectoryMode"
          ]
          // {
            ExecStart = [ execStart ];
            User = [ user ];
            Group = [ group ];
            ReadWritePaths = [ stateDir ];
          }
        );
      };
      sockets.nixd-server = socketFrom serverSocketUnit listen;
    };

  # launchd.daemons.nixd.serviceConfig for nix-darwin = launchd/org.nixd.daemon.plist
  launchd =
    {
      nixd,
      proxyListen,
      configFile ? "/etc/nixd/config.toml",
    }:
    let
      listen = splitListen proxyListen;
    in
    {
      Label = "org.nixd.daemon";
      ProgramArguments = [
        nixd
        "daemon"
        "--config"
        configFile
      ];
      Sockets.proxy = {
        SockNodeName = listen.host;
        SockServiceName = listen.port;
        SockType = "stream";
        SockFamily = if match ".*:.*" listen.host != null then "IPv6" else "IPv4";
      };
      RunAtLoad = true;
      KeepAlive.SuccessfulExit = false;
      ThrottleInterval = 5;
      ExitTimeOut = 30;
      ProcessType = "Adaptive";
      Umask = 63;
      SoftResourceLimits.NumberOfFiles = 65536;
      StandardOutPath = "/var/log/nixd.log";
      StandardErrorPath = "/var/log/nixd.log";
    };
}
