"""The placement policy: a sequence-to-sequence network as in Mirhoseini et al. 2017.

It reads the groups in topological order (their ids) and emits one device per group:

- each group is embedded from its features (envs.features) together with the mean
  features of its predecessors and of its successors, by a learned projection;
- a bidirectional LSTM encodes the sequence of groups;
- an LSTM decoder emits one device per group, fed the group's encoding, an embedding
  of the previous group's device, and what it has placed so far on each device
  (compute share and memory used); content-based attention over the encoder states
  lets it look at the rest of the graph;
- logits are clipped as C * tanh(logits / C) and divided by a temperature.

A per-step mask forbids a device where the group would certainly exceed the memory
cap given what is already placed, and makes a group follow the device of an earlier
group it must share a device with. If every device is masked, none is: the placement
will be infeasible and the reward penalises it.

The policy is bound to one problem at a time (`attach`); its weights do not depend on
the number of groups, and any cluster of up to `max_devices` devices fits, so a
policy trained on one workload can start the search on another.
"""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import numpy as np
import torch
from torch import Tensor, nn

from envs.features import N_FEATURES, group_features
from placer.errors import DeviceSpecError, PlanError
from placer.problem import Placement, PlacementProblem

MASKED = -1e9  # logit of a forbidden device: finite, so that 0 * logp stays 0 in the entropy


class Seq2SeqPolicy(nn.Module):
    def __init__(self, problem: PlacementProblem | None = None, *, max_devices: int = 8, hidden: int = 64,
                 temperature: float = 1.0, logit_clip: float = 5.0):
        super().__init__()
        self.config = {"max_devices": max_devices, "hidden": hidden}
        self.max_devices = max_devices
        self.temperature = temperature
        self.logit_clip = logit_clip
        self.embed = nn.Sequential(nn.Linear(3 * N_FEATURES, hidden), nn.ReLU())
        self.encoder = nn.LSTM(hidden, hidden // 2, batch_first=True, bidirectional=True)
        self.device_embed = nn.Embedding(max_devices + 1, hidden // 4)  # the last one is "no previous group"
        # Per device: valid, compute share placed, memory fraction used, this group's relative cost there.
        self.decoder = nn.LSTMCell(2 * (hidden // 2) + hidden // 4 + 4 * max_devices, hidden)
        self.query = nn.Linear(hidden, 2 * (hidden // 2), bias=False)
        self.combine = nn.Linear(hidden + 2 * (hidden // 2), hidden)
        self.out = nn.Linear(hidden, max_devices)
        self.problem: PlacementProblem | None = None
        if problem is not None:
            self.attach(problem)

    # ----------------------------------------------------------------- the problem
    def attach(self, problem: PlacementProblem) -> "Seq2SeqPolicy":
        """Bind the policy to a problem: derive the tensors that decoding reads (not weights)."""
        n, d = problem.n_groups, problem.n_devices
        if d > self.max_devices:
            raise DeviceSpecError(f"the policy places on at most {self.max_devices} devices; "
                                  f"this cluster has {d} ({problem.cluster.spec()})")
        feats = group_features(problem)
        edges = problem.costs.edges
        pred_sum, succ_sum = np.zeros_like(feats), np.zeros_like(feats)
        np.add.at(pred_sum, edges[:, 1], feats[edges[:, 0]])
        np.add.at(succ_sum, edges[:, 0], feats[edges[:, 1]])
        indeg = np.bincount(edges[:, 1], minlength=n).clip(min=1)[:, None]
        outdeg = np.bincount(edges[:, 0], minlength=n).clip(min=1)[:, None]
        self._x = torch.from_numpy(np.concatenate([feats, pred_sum / indeg, succ_sum / outdeg], axis=1)).float()

        costs = problem.costs
        pad = self.max_devices - d
        compute = torch.from_numpy(np.pad(costs.compute_ms, ((0, 0), (0, pad)))).float()
        self._compute_share = compute / max(float(costs.compute_ms.min(axis=1).sum()), 1e-9)  # [n, max_devices]
        fastest = costs.compute_ms.min(axis=1, keepdims=True).clip(min=1e-9)
        self._relative_cost = torch.from_numpy(np.pad(np.log(costs.compute_ms.clip(min=1e-9) / fastest),
                                                      ((0, 0), (0, pad)))).float()
        self._valid = torch.arange(self.max_devices) < d
        caps = [dev.memory_bytes if dev.memory_bytes is not None else np.inf for dev in problem.cluster.devices]
        self._cap = torch.tensor(caps + [np.inf] * pad, dtype=torch.float64)
        self._memory = torch.from_numpy(costs.memory_bytes.astype(np.float64))

        # Colocation: every group of a set follows its first (lowest id) member, which
        # commits the whole set's memory when it is placed.
        leader = list(range(n))
        commit = costs.memory_bytes.astype(np.float64).copy()
        tied = nx.Graph()
        for members in problem.colocation_sets:
            nx.add_path(tied, members)
        for component in nx.connected_components(tied):
            first = min(component)
            for g in component:
                leader[g] = first
            commit[first] = costs.memory_bytes[sorted(component)].sum()
        self._leader = leader
        self._commit = torch.from_numpy(commit)
        self.problem = problem
        return self

    # ----------------------------------------------------------------- public API
    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """n placements drawn from the policy: (placements LongTensor [n, groups],
        log-probabilities [n], entropies [n], summed over groups). Differentiable
        unless called under torch.no_grad()."""
        return self._decode(n, generator=generator)

    def log_prob(self, placements: Tensor) -> tuple[Tensor, Tensor]:
        """Log-probabilities [n] and entropies [n] of given placements [n, groups]
        (teacher-forced: the decoder is fed the given devices)."""
        placements = torch.as_tensor(placements, dtype=torch.long).reshape(-1, self._x.shape[0])
        _, logp, entropy = self._decode(placements.shape[0], forced=placements)
        return logp, entropy

    @torch.no_grad()
    def greedy(self) -> Placement:
        """The most likely device at every step."""
        placements, _, _ = self._decode(1, greedy=True)
        return tuple(placements[0].tolist())

    def mean_group_prob(self, placement: Placement) -> float:
        """Geometric mean over groups of the probability of the placement's device:
        how firmly the policy has learned a placement."""
        with torch.no_grad():
            logp, _ = self.log_prob(torch.tensor([placement]))
        return float(torch.exp(logp[0] / len(placement)))

    # ----------------------------------------------------------------- decoding
    def _decode(self, batch: int, generator: torch.Generator | None = None, forced: Tensor | None = None,
                greedy: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        if self.problem is None:
            raise RuntimeError("attach(problem) the policy before decoding")
        n = self._x.shape[0]
        encoded, _ = self.encoder(self.embed(self._x).unsqueeze(0))
        encoded = encoded[0]  # [n, enc]
        h = encoded.new_zeros(batch, self.decoder.hidden_size)
        c = torch.zeros_like(h)
        prev = torch.full((batch,), self.max_devices, dtype=torch.long)
        placed = torch.zeros(batch, n, dtype=torch.long)
        load = torch.zeros(batch, self.max_devices)
        used = torch.zeros(batch, self.max_devices, dtype=torch.float64)
        rows = torch.arange(batch)
        log_probs, entropies = [], []
        for i in range(n):
            allowed = self._allowed(i, placed, used)
            used_frac = torch.nan_to_num((used / self._cap).float(), nan=0.0).clamp(max=2.0)
            step_in = torch.cat([encoded[i].expand(batch, -1), self.device_embed(prev),
                                 self._valid.float().expand(batch, -1), load, used_frac,
                                 self._relative_cost[i].expand(batch, -1)], dim=1)
            h, c = self.decoder(step_in, (h, c))
            attention = torch.softmax(self.query(h) @ encoded.T, dim=1)  # [batch, n]
            context = attention @ encoded
            logits = self.out(torch.tanh(self.combine(torch.cat([h, context], dim=1))))
            logits = self.logit_clip * torch.tanh(logits / self.logit_clip) / self.temperature
            logp = torch.log_softmax(logits.masked_fill(~allowed, MASKED), dim=1)
            if forced is not None:
                device = forced[:, i]
            elif greedy:
                device = logp.argmax(dim=1)
            else:
                device = torch.multinomial(logp.detach().exp(), 1, generator=generator).squeeze(1)
            log_probs.append(logp[rows, device])
            entropies.append(-(logp.exp() * logp).sum(dim=1))
            placed[:, i] = device
            prev = device
            load[rows, device] += self._compute_share[i, device]
            used[rows, device] += self._memory[i]
        return placed, torch.stack(log_probs, 1).sum(1), torch.stack(entropies, 1).sum(1)

    def _allowed(self, i: int, placed: Tensor, used: Tensor) -> Tensor:
        """[batch, max_devices] bool: where group i may go given the groups placed so far."""
        batch = placed.shape[0]
        leader = self._leader[i]
        if leader != i:
            allowed = torch.zeros(batch, self.max_devices, dtype=torch.bool)
            allowed[torch.arange(batch), placed[:, leader]] = True
            return allowed
        allowed = self._valid & (used + self._commit[i] <= self._cap)
        return torch.where(allowed.any(dim=1, keepdim=True), allowed, self._valid.expand(batch, -1))


def save_policy(policy: Seq2SeqPolicy, path: Path | str) -> None:
    """Write the policy's weights and constructor arguments (not the problem it is bound to)."""
    torch.save({"format": "placer.policy/v1", "config": policy.config, "state_dict": policy.state_dict()}, path)


def load_policy(path: Path | str) -> Seq2SeqPolicy:
    """A policy saved by save_policy, unbound (attach it to a problem, or pass it to train)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        policy = Seq2SeqPolicy(**saved["config"])
        policy.load_state_dict(saved["state_dict"])
    except FileNotFoundError:
        raise PlanError(f"{path}: no such policy file") from None
    except Exception as exc:  # a corrupt or foreign file
        raise PlanError(f"{path}: not a placer policy file ({type(exc).__name__}: {exc})") from None
    return policy
