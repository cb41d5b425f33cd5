"""A live view of the training statistics: each tick's values as TensorBoard scalars.

TensorBoard is an optional extra (`pip install tensorboard`); `open_writer` says so in one line
when it is missing. Everything written here is also in stats.jsonl, which stays the record.
"""

from torch_utils.errors import UserError

def open_writer(log_dir):
    """A SummaryWriter writing event files into log_dir."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError('--tensorboard needs the tensorboard package; install it with "pip install tensorboard", '
            'or train without --tensorboard') from None
    return SummaryWriter(log_dir=log_dir)

def write_stats(writer, entry, cur_nimg):
    """entry: {name: {'mean': ..., ...}} as a stats.jsonl line; the x axis (step) is images seen."""
    for name, value in entry.items():
        if isinstance(value, dict) and isinstance(value.get('mean'), (int, float)):
            writer.add_scalar(name, value['mean'], global_step=int(cur_nimg))
    writer.flush()
