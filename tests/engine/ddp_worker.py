"""torchrun entry point for test_distributed: the ``vireid-fast`` CLI, plus each rank's final encoder state saved to
``<output_dir>/rank<r>.pt`` (only rank 0 writes the checkpoint, so this is how the test sees the other ranks)."""

import os
import sys

import torch

from vireid_fast import cli
from vireid_fast.engine import Trainer

_fit = Trainer.fit


def fit_and_dump(self):
    result = _fit(self)
    torch.save(self.encoder.state_dict(), os.path.join(self.output_dir, f"rank{self.rank}.pt"))
    return result


Trainer.fit = fit_and_dump

if __name__ == "__main__":
    raise SystemExit(cli.main(sys.argv[1:]))
