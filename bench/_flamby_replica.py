"""FLamby's Fed-TCGA-BRCA local-only protocol in plain PyTorch, for calibration.

Not fedge code: what FLamby's benchmark does for a "Local i" model, re-written
with torch alone so the bench can re-run FLamby's own protocol under other
shuffle streams. Per centre: ``torch.manual_seed(seed)`` and ``Linear(39, 1)``
(the initial model), then ``torch.manual_seed(seed + offset)``,
``DataLoader(shuffle=True, batch_size=8)``, ``torch.optim.Adam(lr=0.1)``, 30
epochs, FLamby's Cox loss (rows sorted by decreasing time, each row's risk set
the rows before it in that order, so tied times are broken by batch order; the
batch mean over all rows). Test C-index as FLamby scores it: lifelines'
``concordance_index(time, -score, event)``. ``offset = 0`` reproduces the local-
only values of FLamby's result files (fedge.demo.flamby_results) to 3 decimals.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import torch
from lifelines.utils import concordance_index
from torch.utils.data import DataLoader, TensorDataset

EPOCHS, BATCH, LR = 30, 8, 0.1


def flamby_cox_loss(scores: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """FLamby's fed_tcga_brca BaselineLoss: truth[:, 0] event, truth[:, 1] time."""
    a = torch.stack((torch.squeeze(scores, dim=1), truth[:, 0], truth[:, 1]), dim=1)
    a = torch.stack(sorted(a, key=lambda row: -row[2]))
    s, e = a[:, 0], a[:, 1]
    shifted = s - s.max()
    return (-(shifted - torch.log(torch.exp(shifted).cumsum(0))) * e).mean()


def breslow_cox_loss(scores: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """The same loss with Breslow's ties (every row with T_j >= T_i at risk), as fedge's."""
    s, e, t = scores.reshape(-1), truth[:, 0], truth[:, 1]
    at_risk = t.reshape(1, -1) >= t.reshape(-1, 1)
    rows = s.reshape(1, -1).expand(len(s), -1)
    log_den = torch.logsumexp(rows.masked_fill(~at_risk, -torch.inf), 1)
    return ((log_den - s) * e).mean()


LOSSES = {"order": flamby_cox_loss, "breslow": breslow_cox_loss}


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def local_only(
    centres: list, seeds: tuple[int, ...], offset: int = 0, ties: str = "order"
) -> list[float]:
    """Per seed, the mean over centres of each centre's own model on its own test rows.

    ``centres``: fedge.demo.tcga.load_centres(..., "none") (raw features, FLamby's split).
    ``ties``: "order" is FLamby's loss; "breslow" the same protocol with Breslow's ties.
    """
    loss_fn = LOSSES[ties]
    out = []
    with torch.random.fork_rng(devices=[]):
        for seed in seeds:
            _seed_all(seed)
            init = torch.nn.Linear(39, 1)
            own = []
            for c in centres:
                train = TensorDataset(torch.from_numpy(c.train.x), torch.from_numpy(c.train.y))
                loader = DataLoader(train, batch_size=BATCH, shuffle=True)
                _seed_all(seed + offset)
                model = copy.deepcopy(init)
                opt = torch.optim.Adam(model.parameters(), lr=LR)
                for _ in range(EPOCHS):
                    for x, y in loader:
                        opt.zero_grad()
                        loss_fn(model(x), y).backward()
                        opt.step()
                with torch.no_grad():
                    score = model(torch.from_numpy(c.test.x)).numpy().reshape(-1)
                y = c.test.y
                own.append(float(concordance_index(y[:, 1], -score, y[:, 0])))
            out.append(float(np.mean(own)))
    return out
