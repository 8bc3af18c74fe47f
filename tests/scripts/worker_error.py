"""A DataLoader with two worker processes whose dataset raises for sample 7."""

import torch
from torch.utils.data import DataLoader, Dataset


class Samples(Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        if i == 7:
            raise ValueError("bad sample 7")
        return torch.tensor([float(i)])


if __name__ == "__main__":
    for batch in DataLoader(Samples(), batch_size=4, num_workers=2):
        pass
    print("unreachable", flush=True)
