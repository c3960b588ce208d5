"""Drop-in replacements for other libraries' objects. ``ddpm_fast.compat.diffusers`` needs the
optional ``diffusers`` package (``pip install ddpm-fast[diffusers]``); importing this package does not."""
