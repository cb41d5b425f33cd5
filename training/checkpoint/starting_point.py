"""What a run starts from besides random weights, checked by setup_training_config before the run
folder exists: the --transfer network must make images of the dataset's shape, and a --resume
state must have the run's seed. (Whether the tensors fit the configured network is found when
the training loop loads them; a run that fails there removes the folder it made.)"""

from fdm.io.network_files import CheckpointError, load_network_file

#----------------------------------------------------------------------------

def _shape_text(channels, resolution, label_dim):
    return f'{channels}-channel {resolution}x{resolution} images with {label_dim} classes'

def read_transfer(path, dataset):
    """The EMA weights {name: tensor} of a network file whose images have the dataset's shape."""
    try:
        net = load_network_file(path)['ema']
    except CheckpointError as err:
        raise CheckpointError(f'--transfer {err}') from None
    have = (net.img_channels, net.img_resolution, net.label_dim)
    want = (dataset.num_channels, dataset.resolution, dataset.label_dim)
    if have != want:
        raise CheckpointError(f'--transfer {path}: the network makes {_shape_text(*have)}, but the dataset has '
            f'{_shape_text(*want)} (with this --cond); transfer from a network trained on data of the same shape')
    return net.state_dict()

# The state's randomness continues only from its own seed.
def check_resume_seed(state, state_path, seed):
    if state['seed'] != seed:
        raise CheckpointError(f'{state_path} was trained with seed {state["seed"]}, not {seed}; '
            'pass --seed with the original value (or none) to resume exactly')

# --transfer: the file's weights start the training (tensors it lacks keep their initialisation).
def load_transfer(net, ema, weights, path):
    try:
        _missing, unexpected = net.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # a tensor of another shape
        raise CheckpointError(f'{path} does not fit the configured network ({str(err).strip().splitlines()[-1][:200]}); '
            'check --arch/--precond/--cbase/--cres against the transferred network') from None
    if unexpected:
        raise CheckpointError(f'{path}: tensors {unexpected[:3]} do not exist in the configured network; '
            'check --arch/--precond/--cond against the transferred network')
    ema.load_state_dict(net.state_dict())

#----------------------------------------------------------------------------
