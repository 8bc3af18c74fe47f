"""A class defined in the script pickles, and spawn DataLoader workers can load a Dataset defined here."""

import pickle

import torch
from torch.utils.data import DataLoader, Dataset


class Point:
    def __init__(self, x):
        self.x = x


class Squares(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.tensor([float(i * i)])


if __name__ == "__main__":
    p = pickle.loads(pickle.dumps(Point(5)))
    print(f"pickled {type(p).__module__}.{type(p).__qualname__} x={p.x}", flush=True)
    loader = DataLoader(Squares(), batch_size=4, num_workers=2, multiprocessing_context="spawn")
    total = sum(float(batch.sum()) for batch in loader)
    print(f"total {total:.0f}", flush=True)
