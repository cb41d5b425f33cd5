"""Training statistics accumulated on the device and read once per tick.

`report(name, values)` adds count, sum and sum of squares of a tensor to device-side
accumulators without synchronising with the host; `collect()` sums them over all ranks
and returns {name: {num, mean, std}}, the layout of the reference's stats.jsonl.
"""

import torch

from torch_utils import distributed

#----------------------------------------------------------------------------

class StatsCollector:
    def __init__(self, device):
        self.device = torch.device(device)
        self._moments = {}  # name -> float64 tensor [count, sum, sum of squares] on the device

    def report(self, name, values):
        """Accumulate every element of `values` (a tensor or a number) under `name`."""
        values = torch.as_tensor(values).detach().to(self.device, torch.float64).reshape(-1)
        # torch.full is a device-side fill; torch.tensor(...) would copy from the host every step.
        count = torch.full([], float(values.numel()), dtype=torch.float64, device=self.device)
        moments = torch.stack([count, values.sum(), values.square().sum()])
        if name in self._moments:
            self._moments[name] += moments
        else:
            self._moments[name] = moments

    def collect(self):
        """Reduce over ranks, return {name: {num, mean, std}} and reset. Same names on every rank."""
        names = sorted(self._moments)
        if not names:
            return {}
        moments = torch.stack([self._moments[n] for n in names])  # [names, 3]
        if distributed.is_distributed():
            torch.distributed.all_reduce(moments)
        moments = moments.cpu().tolist()
        self._moments = {}
        result = {}
        for name, (num, total, total_sq) in zip(names, moments):
            mean = total / num if num else float('nan')
            var = max(total_sq / num - mean ** 2, 0.0) if num else float('nan')
            result[name] = dict(num=num, mean=mean, std=var ** 0.5)
        return result

#----------------------------------------------------------------------------
