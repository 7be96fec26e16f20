# NixOS module: `services.nixd` (the daemon and its local proxy substituter) and
# `services.nixd-server` (the cache server).
#
# services.nixd runs the unit the Debian install runs (./units.nix reads systemd/), writes
# /etc/nixd/config.toml from `settings` (./render.nix) and adds `!include <fragment>` to
# nix.conf through nix.extraOptions: /etc/nix/nix.conf is a read-only link into the store
# on NixOS, so the daemon writes only its fragment and netrc there and finds the include
# already in place. `login` logs the machine in at boot with an API token file or the
# machine's AWS identity; without it, log in by hand once (`sudo nixd login`) and the
# daemon keeps the login across restarts.
#
# services.nixd-server keeps everything in `stateDir`. On the first start it runs
# `nixd-server init` (keys, database, the first organization and its admin token; what
# init prints, the token included, goes to `stateDir/init.txt`, readable by the service
# user only); on every start config.toml is written from `settings` and `listen`. It runs
# the shipped systemd/nixd-server.service (./units.nix), listening on `listen` through
# nixd-server.socket.
# Storage backends are settings too ([storage] database and blobs, relative to stateDir).
{
  config,
  lib,
  pkgs,
  ...
}:
let
  render = import ./render.nix;
  units = import ./units.nix;
  cfg = config.services.nixd;
  srv = config.services.nixd-server;
  settingsType = lib.types.attrsOf lib.types.anything;
  defaultPackage = pkgs.callPackage ./package.nix { };
  nixdBin = "${cfg.package}/bin/nixd";
  serverBin = "${srv.package}/bin/nixd-server";
  # the shipped systemd/nixd-server.{service,socket} (Type=notify, the same hardening),
  # listening on `listen` by socket activation
  serverUnits = units.server {
    execStart = "${serverBin} serve ${lib.escapeShellArg srv.stateDir}";
    inherit (srv) stateDir user group listen;
  };
  header = owner: ''
    # Written by the NixOS module ${owner} from its `settings`: change them there.
  '';
  daemonConfig = render cfg.settings;
  serverConfig = render (
    lib.recursiveUpdate srv.settings { server.listen = srv.listen; }
  );
  loginArgs =
    if cfg.login.method == "token" then
      [
        "token"
        "--token-file"
        cfg.login.tokenFile
      ]
    else
      [ cfg.login.method ];
in
{
  options.services.nixd = import ./daemon-options.nix { inherit lib pkgs; };

  options.services.nixd-server = {
    enable = lib.mkEnableOption "nixd-server, the identity-aware Nix binary cache server";

    package = lib.mkOption {
      type = lib.types.package;
      default = defaultPackage;
      defaultText = lib.literalExpression "pkgs.callPackage <nixd>/packaging/nix/package.nix { }";
      description = "The nixd package (its `nixd-server` runs the server).";
    };

    stateDir = lib.mkOption {
      type = lib.types.str;
      default = "/var/lib/nixd-server";
      description = "The server's state directory: config.toml, policy.toml, keys, database, blobs, audit log.";
    };

    listen = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ "127.0.0.1:8080" ];
      example = [ "0.0.0.0:8080" ];
      description = "Addresses to serve on (`[server] listen`): host:port, [v6]:port.";
    };

    organization = lib.mkOption {
      type = lib.types.str;
      default = "main";
      description = "The first organization, created by `nixd-server init` on the first start.";
    };

    settings = lib.mkOption {
      type = settingsType;
      default = { };
      example = lib.literalExpression ''
        {
          storage.max_upload_bytes = 17179869184;
          device.public_url = "https://cache.example.org";
          github = [ { org = "main"; audience = "https://cache.example.org"; owner_ids = [ "1001" ]; } ];
        }
      '';
      description = ''
        The server's config.toml as an attribute set (sections server, storage, tokens,
        policy, audit, device and the lists github, gitlab, aws); `listen` fills
        server.listen. Keys left out keep nixd-server's defaults.
      '';
    };

    user = lib.mkOption {
      type = lib.types.str;
      default = "nixd-server";
      description = "The user the server runs as (created if left at the default).";
    };
    group = lib.mkOption {
      type = lib.types.str;
      default = "nixd-server";
      description = "The group the server runs as (created if left at the default).";
    };
  };

  config = lib.mkMerge [
    (lib.mkIf cfg.enable {
      assertions = [
        {
          assertion = cfg.login.method != "token" || cfg.login.tokenFile != null;
          message = "services.nixd.login.method = \"token\" needs services.nixd.login.tokenFile";
        }
      ];

      environment.systemPackages = [ cfg.package ];
      environment.etc."nixd/config.toml".text = header "services.nixd" + daemonConfig;

      # nix.conf is generated: the include goes in here, and the daemon only writes the
      # fragment and its netrc (`!include` of a missing file is no error for Nix).
      nix.extraOptions = ''
        !include ${cfg.settings.nix.fragment}
      '';

      systemd =
        let
          u = units.systemd {
            nixd = nixdBin;
            kill = "${pkgs.coreutils}/bin/kill";
            proxyListen = cfg.settings.proxy.listen;
          };
        in
        {
          services.nixd = u.services.nixd // {
            # the daemon re-reads its config on SIGHUP: a settings change is a reload
            reloadTriggers = [ daemonConfig ];
          };
          sockets.nixd = u.sockets.nixd;
          sockets.nixd-proxy = u.sockets.nixd-proxy;

          services.nixd-login = lib.mkIf (cfg.login.method != null) {
            description = "Log nixd in (${cfg.login.method})";
            wantedBy = [ "multi-user.target" ];
            requires = [ "nixd.service" ];
            after = [
              "nixd.service"
              "network-online.target"
            ];
            wants = [ "network-online.target" ];
            serviceConfig = {
              Type = "oneshot";
              RemainAfterExit = true;
              ExecStart = lib.escapeShellArgs ([ nixdBin "login" ] ++ loginArgs ++ cfg.login.extraArgs);
              Restart = "on-failure";
              RestartSec = "10s";
            };
          };
        };
    })

    (lib.mkIf srv.enable {
      assertions = [
        {
          assertion = srv.listen != [ ];
          message = "services.nixd-server.listen needs at least one address";
        }
      ];
      environment.systemPackages = [ srv.package ];

      users.users = lib.mkIf (srv.user == "nixd-server") {
        nixd-server = {
          isSystemUser = true;
          group = srv.group;
          home = srv.stateDir;
          description = "nixd cache server";
        };
      };
      users.groups = lib.mkIf (srv.group == "nixd-server") { nixd-server = { }; };

      systemd.tmpfiles.rules = [ "d ${srv.stateDir} 0700 ${srv.user} ${srv.group} - -" ];

      systemd.services.nixd-server = lib.recursiveUpdate serverUnits.services.nixd-server {
        restartTriggers = [ serverConfig ];
        preStart = ''
          set -eu
          umask 077
          state=${lib.escapeShellArg srv.stateDir}
          if [ ! -e "$state/config.toml" ]; then
            ${serverBin} init "$state" --org ${lib.escapeShellArg srv.organization} \
              --listen ${lib.escapeShellArg (builtins.head srv.listen)} > "$state/init.txt"
            echo "nixd-server: initialized $state; its admin token is in $state/init.txt"
          fi
          install -m 0600 ${pkgs.writeText "nixd-server-config.toml" (header "services.nixd-server" + serverConfig)} "$state/config.toml"
        '';
      };
      systemd.sockets.nixd-server = serverUnits.sockets.nixd-server;
    })
  ];
}
