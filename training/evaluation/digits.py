"""A detector for the embedded digits dataset: a small CNN classifier of the UCI handwritten
digits (scikit-learn's 8x8 digits), trained by our own code in seconds on the CPU.

Its 64-d penultimate features give a Frechet distance ("FD-digits", `fid.py --detector=digits`)
and its predictions give the accuracy with which class-conditional samples show the class
they were asked for. The weights are committed (`digits_classifier.pt`, ~150 kB) so that
FD-digits numbers are comparable between machines; `python -m training.tools.digits_classifier --train`
rebuilds them deterministically.
"""

import os

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn

from training.data.sources import load_sklearn_digits

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'digits_classifier.pt')
RESOLUTION = 16     # every input is resized to this before classification
FEATURE_DIM = 64

#----------------------------------------------------------------------------
# uint8 [N, 1 or 3, H, W] -> logits [N, 10], or features [N, 64] with return_features.

class DigitsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv1 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc0 = nn.Linear(32 * 4 * 4, FEATURE_DIM)
        self.fc1 = nn.Linear(FEATURE_DIM, 10)

    def preprocess(self, images):
        x = images.to(torch.float32).mean(dim=1, keepdim=True) / 255  # grayscale [N, 1, H, W] in [0, 1]
        if x.shape[-1] != RESOLUTION or x.shape[-2] != RESOLUTION:
            x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode='bilinear', antialias=True, align_corners=False)
        return x * 2 - 1

    def forward(self, images, return_features=False):
        x = self.preprocess(images)
        x = F.max_pool2d(F.relu(self.conv0(x)), 2)  # [N, 16, 8, 8]
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # [N, 32, 4, 4]
        features = F.relu(self.fc0(x.flatten(1)))   # [N, 64]
        return features if return_features else self.fc1(features)

#----------------------------------------------------------------------------
# The digits as uint8 [N, 1, 16, 16], upscaled with Lanczos exactly as dataset_tool.py --resolution does.
def digits_images(resolution=RESOLUTION):
    images, labels = load_sklearn_digits()
    images = [np.asarray(PIL.Image.fromarray(image).resize((resolution, resolution), PIL.Image.LANCZOS)) for image in images]
    return torch.from_numpy(np.stack(images))[:, None], torch.tensor(labels)

def train_classifier(seed=0, epochs=40, holdout=0.2):
    """Train on a fixed split; return (net, held-out accuracy). Deterministic on one machine."""
    images, labels = digits_images()
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=g)
    n_test = int(len(images) * holdout)
    test, train = order[:n_test], order[n_test:]
    torch.manual_seed(seed)
    net = DigitsNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        perm = train[torch.randperm(len(train), generator=g)]
        for batch in perm.split(64):
            x = images[batch].to(torch.float32)
            # Robustness to generated samples: shifts of up to 1 pixel and a little noise.
            dy, dx = torch.randint(-1, 2, [2], generator=g).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            x = (x + torch.randn(x.shape, generator=g) * 8).clamp(0, 255)
            loss = F.cross_entropy(net(x), labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(images[test]).argmax(1) == labels[test]).float().mean().item()
    return net, accuracy

def load_classifier(device='cpu'):
    if not os.path.isfile(WEIGHTS):
        raise FileNotFoundError(f'{WEIGHTS} is missing; rebuild it with: python -m training.tools.digits_classifier --train')
    net = DigitsNet()
    net.load_state_dict(torch.load(WEIGHTS, map_location='cpu', weights_only=True))
    return net.eval().requires_grad_(False).to(device)

@torch.no_grad()
def class_accuracy(images, labels, device='cpu'):
    """Fraction of uint8 images [N, C, H, W] that the classifier assigns their requested class."""
    net = load_classifier(device)
    predictions = torch.cat([net(batch.to(device)).argmax(1).cpu() for batch in images.split(256)])
    return (predictions == labels.cpu()).float().mean().item()

#----------------------------------------------------------------------------
