"""The placement policy: a sequence-to-sequence network as in Mirhoseini et al. 2017,
with a graph encoder in front as in Placeto and GDP.

It reads the groups in topological order (their ids) and emits one device per group,
for a micro-batch count it is given (the trainer picks the count: placer.rl.trainer):

- each group is embedded from its features (envs.features: op mix, costs per device
  kind, memory, bytes in and out, its place on the critical path);
- `graph_layers` rounds of message passing over the grouped DAG (GraphSAGE-style, as
  GDP): each group adds a learned function of itself and of the mean of its
  predecessors' and of its successors' states, so that after k rounds it sees its
  k-hop neighbourhood in both directions (Placeto's parent and child aggregation);
- a bidirectional LSTM encodes the sequence of groups in topological order (the paper's
  encoder);
- an LSTM decoder emits one device per group, fed the group's encoding, an embedding
  of the previous group's device, and per device: what it holds so far (share of the
  compute, fraction of the memory cap), the group's relative cost there, and the
  share of the group's input bytes produced there (so "stay beside your inputs" and
  "balance the load" are easy to learn), and the micro-batch count (one-hot), so that
  a pipelined candidate can be placed otherwise than an unpipelined one (spread over
  more devices, say); content-based attention over the encoder states lets it look at
  the rest of the graph;
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

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from envs.features import N_FEATURES, group_features
from graphs.errors import DeviceSpecError
from graphs.problem import Placement, PlacementProblem

MICROBATCH_CHOICES = (1, 2, 4, 8, 16, 32)  # the micro-batch counts a placement can be conditioned on


class Sample(NamedTuple):
    """Candidates drawn from the policy, with what the update needs."""

    placements: Tensor  # [n, groups] device indices
    microbatches: Tensor  # [n] index into MICROBATCH_CHOICES: the counts the placements were drawn for
    logp: Tensor  # [n] log-probability of the placement, given its micro-batch count
    entropy: Tensor  # [n] summed over the groups


class GraphLayer(nn.Module):
    """One round of message passing: h + relu(W [h, mean over predecessors, mean over successors])."""

    def __init__(self, hidden: int):
        super().__init__()
        self.mix = nn.Linear(3 * hidden, hidden)

    def forward(self, h: Tensor, src: Tensor, dst: Tensor, indeg: Tensor, outdeg: Tensor) -> Tensor:
        from_preds = torch.zeros_like(h).index_add(0, dst, h[src]) / indeg
        from_succs = torch.zeros_like(h).index_add(0, src, h[dst]) / outdeg
        return h + torch.relu(self.mix(torch.cat([h, from_preds, from_succs], dim=-1)))


class Seq2SeqPolicy(nn.Module):
    """max_devices, hidden and graph_layers fix the weights' shapes (a saved policy records
    them); temperature, logit_clip and masked_logit only shape the output distribution
    and may be changed (the trainer sets them from its TrainConfig)."""

    def __init__(self, problem: PlacementProblem | None = None, *, max_devices: int = 8, hidden: int = 64,
                 graph_layers: int = 2, temperature: float = 1.0, logit_clip: float = 5.0,
                 masked_logit: float = -1e9):
        super().__init__()
        self.config = {"max_devices": max_devices, "hidden": hidden, "graph_layers": graph_layers}
        self.max_devices = max_devices
        self.temperature = temperature
        self.logit_clip = logit_clip
        self.masked_logit = masked_logit  # finite, so that 0 * logp stays 0 in the entropy
        self.embed = nn.Sequential(nn.Linear(N_FEATURES, hidden), nn.ReLU())
        self.graph = nn.ModuleList(GraphLayer(hidden) for _ in range(graph_layers))
        self.encoder = nn.LSTM(hidden, hidden // 2, batch_first=True, bidirectional=True)
        self.device_embed = nn.Embedding(max_devices + 1, hidden // 4)  # the last one is "no previous group"
        # Per device: valid, compute share placed, memory fraction used, this group's relative
        # cost there, and the share of its input bytes that comes from there.
        # ... and the micro-batch count, one-hot over MICROBATCH_CHOICES.
        self.decoder = nn.LSTM(2 * (hidden // 2) + hidden // 4 + 5 * max_devices + len(MICROBATCH_CHOICES), hidden,
                               batch_first=True)
        self.query = nn.Linear(hidden, 2 * (hidden // 2), bias=False)
        self.combine = nn.Linear(hidden + 2 * (hidden // 2), hidden)
        self.out = nn.Linear(hidden, max_devices)
        self.problem: PlacementProblem | None = None
        if problem is not None:
            self.attach(problem)

    # ----------------------------------------------------------------- the problem
    def attach(self, problem: PlacementProblem) -> "Seq2SeqPolicy":
        """Bind the policy to a problem: derive the tensors that decoding reads (not weights).

        Raises DeviceSpecError when the cluster has more devices than the policy's max_devices."""
        n, d = problem.n_groups, problem.n_devices
        if d > self.max_devices:
            raise DeviceSpecError(f"the policy places on at most {self.max_devices} devices; "
                                  f"this cluster has {d} ({problem.cluster.spec()})")
        self._x = torch.from_numpy(group_features(problem)).float()
        edges = problem.costs.edges
        self._src, self._dst = torch.from_numpy(edges[:, 0]), torch.from_numpy(edges[:, 1])
        self._indeg = torch.bincount(self._dst, minlength=n).clamp(min=1)[:, None].float()
        self._outdeg = torch.bincount(self._src, minlength=n).clamp(min=1)[:, None].float()

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
        # Every edge with the share of its consumer's input bytes that it carries.
        into_bytes = np.bincount(edges[:, 1], weights=costs.edge_bytes, minlength=n).clip(min=1.0)
        self._edge_share = torch.from_numpy(costs.edge_bytes / into_bytes[edges[:, 1]]).float()
        self._edges_into = [torch.from_numpy(np.flatnonzero(edges[:, 1] == i)) for i in range(n)]

        # Colocation: every group of a set follows its first (lowest id) member, which
        # commits the whole set's memory when it is placed.
        leader = np.array(problem.colocation_leader)
        commit = np.zeros(n)
        np.add.at(commit, leader, costs.memory_bytes)  # a leader commits its whole set
        commit[leader != np.arange(n)] = costs.memory_bytes[leader != np.arange(n)]  # followers: their own
        self._leader = torch.from_numpy(leader)
        self._is_follower = self._leader != torch.arange(n)
        self._commit = torch.from_numpy(commit)
        self._n = n
        self.problem = problem
        return self

    # ----------------------------------------------------------------- public API
    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, microbatches: Tensor | None = None) -> Sample:
        """n placements drawn from the policy, each for its micro-batch count (`microbatches`:
        [n] indices into MICROBATCH_CHOICES; None: all one micro-batch). Not differentiable:
        take gradients through log_prob, which scores the whole sequence at once."""
        return self._decode(n, self._counts(n, microbatches), generator=generator)

    @torch.no_grad()
    def greedy(self, microbatches: int = 1) -> Placement:
        """The most likely device at every step, for `microbatches` micro-batches.

        Raises ValueError for a count outside MICROBATCH_CHOICES."""
        return tuple(self._decode(1, microbatch_indices([microbatches]), greedy=True).placements[0].tolist())

    def log_prob(self, placements: Tensor, microbatches: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Log-probabilities [n] and entropies [n] of given placements [n, groups], each
        given its micro-batch count (`microbatches`: [n] indices into MICROBATCH_CHOICES;
        None: all one micro-batch).

        Teacher-forced: every step's inputs follow from the given placements, so the
        decoder runs over the whole sequence in one call instead of step by step."""
        self._require_problem()
        placements = torch.as_tensor(placements, dtype=torch.long).reshape(-1, self._n)
        batch, n, d = placements.shape[0], self._n, self.max_devices
        counts = self._counts(batch, microbatches)
        encoded = self._encode()
        onehot = nn.functional.one_hot(placements, d)  # [batch, n, d]
        prev = torch.cat([torch.full((batch, 1), d), placements[:, :-1]], dim=1)
        # What devices hold before each step: sums over the earlier groups, in the
        # same order of additions as step-by-step decoding (the masks compare exactly).
        load = _before(torch.cumsum(onehot * self._compute_share, dim=1))
        used = _before(torch.cumsum(onehot * self._memory[:, None], dim=1))
        inputs_from = torch.zeros(batch, n, d).index_add_(
            1, self._dst, onehot[:, self._src].float() * self._edge_share[:, None])
        allowed = self._allowed(used, self._commit, placements[:, self._leader], self._is_follower)
        steps = self._step_inputs(encoded.expand(batch, -1, -1), prev, load, used, inputs_from, self._relative_cost,
                                  counts[:, None].expand(batch, n))
        hidden, _ = self.decoder(steps)
        logp = self._log_probs(hidden, encoded, allowed)  # [batch, n, d]
        return logp.gather(2, placements[:, :, None]).squeeze(2).sum(1), _entropy(logp).sum(1)

    # ----------------------------------------------------------------- decoding
    def _decode(self, batch: int, counts: Tensor, generator: torch.Generator | None = None,
                greedy: bool = False) -> Sample:
        """Step-by-step decoding for micro-batch counts `counts` ([batch] indices): each
        step's device is drawn (or the argmax) before the next."""
        self._require_problem()
        n, d = self._n, self.max_devices
        encoded = self._encode()
        cell = self.decoder
        h = c = torch.zeros(batch, cell.hidden_size)
        prev = torch.full((batch,), d, dtype=torch.long)
        placed = torch.zeros(batch, n, dtype=torch.long)
        load = torch.zeros(batch, d)
        used = torch.zeros(batch, d, dtype=torch.float64)
        rows = torch.arange(batch)
        log_probs, entropies = [], []
        for i in range(n):
            edges = self._edges_into[i]
            producers = placed[:, self._src[edges]]
            inputs_from = (nn.functional.one_hot(producers, d) * self._edge_share[edges, None]).sum(1)
            allowed = self._allowed(used, self._commit[i], placed[:, self._leader[i]], self._is_follower[i])
            step_in = self._step_inputs(encoded[i].expand(batch, -1), prev, load, used, inputs_from,
                                        self._relative_cost[i], counts)
            # One step of the decoder LSTM, without nn.LSTM's per-call overhead (3x faster here).
            h, c = torch.lstm_cell(step_in, (h, c), cell.weight_ih_l0, cell.weight_hh_l0,
                                   cell.bias_ih_l0, cell.bias_hh_l0)
            logp = self._log_probs(h, encoded, allowed)  # [batch, d]
            device = self._choose(logp, generator, greedy)
            log_probs.append(logp[rows, device])
            entropies.append(_entropy(logp))
            placed[:, i] = device
            prev = device
            load[rows, device] += self._compute_share[i, device]
            used[rows, device] += self._memory[i]
        return Sample(placed, counts, torch.stack(log_probs, 1).sum(1), torch.stack(entropies, 1).sum(1))

    @staticmethod
    def _choose(logp: Tensor, generator: torch.Generator | None, greedy: bool) -> Tensor:
        if greedy:
            return logp.argmax(dim=-1)
        return torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)

    def _encode(self) -> Tensor:
        """[n, 2 * (hidden // 2)]: message passing over the DAG, then the bidirectional LSTM in topological order."""
        h = self.embed(self._x)
        for layer in self.graph:
            h = layer(h, self._src, self._dst, self._indeg, self._outdeg)
        encoded, _ = self.encoder(h.unsqueeze(0))
        return encoded[0]

    @staticmethod
    def _counts(batch: int, microbatches: Tensor | None) -> Tensor:
        """[batch] indices into MICROBATCH_CHOICES: `microbatches`, or all one micro-batch."""
        if microbatches is None:
            return torch.zeros(batch, dtype=torch.long)
        return torch.as_tensor(microbatches, dtype=torch.long).reshape(batch)

    def _step_inputs(self, encoded: Tensor, prev: Tensor, load: Tensor, used: Tensor, inputs_from: Tensor,
                     relative_cost: Tensor, counts: Tensor) -> Tensor:
        """The decoder's input for one step ([batch, ...]) or every step ([batch, n, ...]);
        `counts`: the micro-batch count indices, [batch] or [batch, n]."""
        used_frac = torch.nan_to_num((used / self._cap).float(), nan=0.0).clamp(max=2.0)
        shape = load.shape
        return torch.cat([encoded, self.device_embed(prev), self._valid.float().expand(shape), load, used_frac,
                          relative_cost.expand(shape), inputs_from.float(),
                          nn.functional.one_hot(counts, len(MICROBATCH_CHOICES)).float()], dim=-1)

    def _log_probs(self, hidden: Tensor, encoded: Tensor, allowed: Tensor) -> Tensor:
        """Masked log-probabilities over devices from decoder states [..., hidden],
        with content-based attention over the encoder states."""
        attention = torch.softmax(self.query(hidden) @ encoded.T, dim=-1)
        context = attention @ encoded
        logits = self.out(torch.tanh(self.combine(torch.cat([hidden, context], dim=-1))))
        logits = self.logit_clip * torch.tanh(logits / self.logit_clip) / self.temperature
        return torch.log_softmax(logits.masked_fill(~allowed, self.masked_logit), dim=-1)

    def _allowed(self, used: Tensor, commit: Tensor, leader_device: Tensor, is_follower: Tensor) -> Tensor:
        """Where a group may go ([..., max_devices] bool), given the bytes each device
        holds before it, what placing it commits, and whether it must follow its
        colocation leader's device."""
        fits = self._valid & (used + commit[..., None] <= self._cap)
        fits = torch.where(fits.any(dim=-1, keepdim=True), fits, self._valid)
        follow = nn.functional.one_hot(leader_device, self.max_devices).bool()
        return torch.where(is_follower[..., None], follow, fits)

    def _require_problem(self) -> None:
        if self.problem is None:
            raise RuntimeError("attach(problem) the policy before decoding")


def microbatch_indices(counts: Sequence[int]) -> Tensor:
    """[len(counts)] indices of micro-batch counts into MICROBATCH_CHOICES.

    Raises ValueError for a count outside MICROBATCH_CHOICES."""
    unknown = sorted(set(counts) - set(MICROBATCH_CHOICES))
    if unknown:
        raise ValueError(f"micro-batch counts {unknown} are not among {MICROBATCH_CHOICES}: choose among those")
    return torch.tensor([MICROBATCH_CHOICES.index(m) for m in counts], dtype=torch.long)


def _before(cumulative: Tensor) -> Tensor:
    """Exclusive prefix sums along dim 1 from inclusive ones: row i sums rows < i."""
    return torch.cat([torch.zeros_like(cumulative[:, :1]), cumulative[:, :-1]], dim=1)


def _entropy(logp: Tensor) -> Tensor:
    return -(logp.exp() * logp).sum(dim=-1)
