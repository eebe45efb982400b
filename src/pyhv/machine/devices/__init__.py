"""Legacy platform devices, one module each; the UART lives in hvcore.uart (hot path)."""
