"""The --compile / --compile-mode rule shared by train.py, generate.py and fid.py."""

# torch.compile modes; reduce-overhead and max-autotune also capture CUDA graphs.
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune')

def resolve_compile_mode(compile, mode=None):
    """--compile (a flag) and --compile-mode -> the torch.compile mode, or None when not compiling.
    ValueError (the message is for the user) for a mode without --compile or an unknown mode."""
    if mode is not None and not compile:
        raise ValueError('--compile-mode applies only with --compile; add --compile or drop --compile-mode')
    if mode not in (None, *COMPILE_MODES):
        raise ValueError(f'unknown --compile-mode {mode!r}; expected one of {", ".join(COMPILE_MODES)}')
    return (mode or 'default') if compile else None
