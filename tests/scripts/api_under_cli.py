"""A script that uses the Python API; run plain or under ``python -m tui_debug``.

Batch 2 holds a NaN input; sample 45 raises in the dataset. argv[1]: where the API's report goes.
"""

import sys

import torch
from torch import nn

from tui_debug import DebugConfig, DebuggingInterface

torch.manual_seed(0)
X = torch.randn(64, 4)
Y = X.sum(1, keepdim=True)
X[20, 1] = float("nan")


class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        if i == 45:
            raise KeyError(f"sample {i} is corrupt")
        return X[i], Y[i]


model = nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
di = DebuggingInterface(DebugConfig(enable_file_output=False, enable_console_output=False))
result = di.debug_training_loop(model, optimizer, nn.MSELoss(), torch.utils.data.DataLoader(Data(), batch_size=8),
                                num_epochs=2)
di.generate_debug_report(sys.argv[1])
print("under monitor:", di.debugger.monitor is not None, "steps:", result["steps"],
      "finite:", all(bool(torch.isfinite(p).all()) for p in model.parameters()))
