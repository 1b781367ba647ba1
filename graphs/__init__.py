"""Workloads, their capture as graphs, profiling, grouping, and lower bounds.

Two graph shapes flow out of this package, both plain `networkx.DiGraph`s:

**OpGraph** (`graphs.capture`, annotated by `graphs.profile`): one node per traced
fx node, keyed by the fx node name.
  graph attrs: `name` (workload), `fingerprint` (str), `colocate` (list of lists of
      node names that must share a device, e.g. users of a tied weight),
      `granularity` ("op", or "module" when capture fell back to coarser grain),
      `leaf_paths` (module paths traced as leaves), after profiling `device_kinds`.
  node attrs: `op` (fx op), `target` (str), `module` (owning module's qualified
      name, "" for the root), `op_type` (coarse category: conv, linear, matmul,
      lstm, embedding, norm, pool, activation, elementwise, reshape, attention,
      loss, input, output, param, other), `params` (dict qualified name -> bytes of
      parameters and buffers the node uses), `out_bytes` (int), `order` (int, fx
      order); after profiling also `fwd_ms`, `bwd_ms` and `opt_ms` (dict device kind
      -> ms; opt_ms is the optimizer step's time for the node's parameters),
      `param_bytes`, `grad_bytes`, `opt_bytes` (a shared parameter is counted at
      its first user only) and `act_bytes` (bytes saved for backward).
  edge attrs: `bytes` (bytes of the tensor(s) crossing the edge).

**GroupedGraph** (`graphs.group`): nodes are ints 0..n-1 numbered in a topological
order of the (acyclic) quotient graph.
  graph attrs: `name`, `fingerprint`, `device_kinds`, `colocate` (list of lists of
      group ids that must share a device).
  node attrs: `name` (readable: a module path), `members` (list of op node names),
      `fwd_ms`, `bwd_ms`, `opt_ms` (dict kind -> ms, sums), `param_bytes`, `grad_bytes`,
      `opt_bytes`, `act_bytes`, `out_bytes` (sums), `op_mix` (dict op_type -> count).
  edge attrs: `bytes` (sum over the op edges between the two groups).
"""
