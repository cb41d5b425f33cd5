"""Train (or evaluate) the digits classifier behind FD-digits (training/evaluation/digits.py).

    python -m training.tools.digits_classifier --train   # rebuild the committed weights, deterministically
    python -m training.tools.digits_classifier           # its accuracy on all 1,797 digits
"""

import io
import os

import click
import torch

from torch_utils.io.files import atomic_write
from training.evaluation import digits

#----------------------------------------------------------------------------

@click.command()
@click.option('--train', 'do_train', is_flag=True, help=f'Train and write {os.path.basename(digits.WEIGHTS)}')
@click.option('--seed', type=int, default=0, show_default=True)
def main(do_train, seed):
    """Train (or evaluate) the digits classifier used by FD-digits."""
    if do_train:
        net, accuracy = digits.train_classifier(seed)
        buf = io.BytesIO()
        torch.save(net.state_dict(), buf)
        atomic_write(digits.WEIGHTS, lambda f: f.write(buf.getvalue()))
        click.echo(f'Wrote {digits.WEIGHTS} ({len(buf.getvalue()) / 1024:.0f} kB); held-out accuracy {accuracy:.4f}')
    else:
        images, labels = digits.digits_images()
        click.echo(f'Accuracy on all digits: {digits.class_accuracy(images, labels):.4f}')

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
