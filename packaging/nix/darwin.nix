# nix-darwin module: `services.nixd`, the daemon as the LaunchDaemon org.nixd.daemon —
# the dictionary of launchd/org.nixd.daemon.plist (./units.nix), with the package's nixd
# and the proxy's port from `settings`. Options are those of the NixOS module
# (./daemon-options.nix); /etc/nixd/config.toml is rendered by ./render.nix.
#
# nix.conf gets `!include <fragment>` through nix.extraOptions while nix-darwin manages Nix
# (nix.enable); with Determinate Nix (nix.enable = false) nixd itself writes the include
# into nix.custom.conf. `login` runs `nixd login METHOD` once at load, as on NixOS.
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
  nixdBin = "${cfg.package}/bin/nixd";
  daemonConfig = render cfg.settings;
  nixManaged = config.nix.enable or true;
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

  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      {
        assertions = [
          {
            assertion = cfg.login.method != "token" || cfg.login.tokenFile != null;
            message = "services.nixd.login.method = \"token\" needs services.nixd.login.tokenFile";
          }
        ];

        environment.systemPackages = [ cfg.package ];
        environment.etc."nixd/config.toml".text = ''
          # Written by the nix-darwin module services.nixd from its `settings`: change them there.
        '' + daemonConfig;

        launchd.daemons.nixd.serviceConfig = units.launchd {
          nixd = nixdBin;
          proxyListen = cfg.settings.proxy.listen;
        };

        launchd.daemons.nixd-login = lib.mkIf (cfg.login.method != null) {
          serviceConfig = {
            Label = "org.nixd.login";
            ProgramArguments = [
              nixdBin
              "login"
            ] ++ loginArgs ++ cfg.login.extraArgs;
            RunAtLoad = true;
            # retried while the daemon or the network is not up yet
            KeepAlive.SuccessfulExit = false;
            ThrottleInterval = 30;
            StandardOutPath = "/var/log/nixd-login.log";
            StandardErrorPath = "/var/log/nixd-login.log";
          };
        };
      }
      (lib.mkIf nixManaged {
        nix.extraOptions = ''
          !include ${cfg.settings.nix.fragment}
        '';
      })
    ]
  );
}
