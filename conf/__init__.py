# Hydra configs for selfloop, packaged as `selfloop.conf` so `pkg://selfloop.conf` finds them.
