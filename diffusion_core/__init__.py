"""Pure model and math of ADM: networks, Gaussian diffusion, guidance, presets. No I/O, no ranks."""
