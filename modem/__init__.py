"""The link: Hayes AT dialer on pyserial, link backends and the simulated modem."""
