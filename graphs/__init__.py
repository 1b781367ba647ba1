"""Workloads, their capture as graphs, profiling, grouping, and lower bounds.

Two graph shapes flow out of this package, both plain `networkx.DiGraph`s:

**OpGraph** (`graphs.capture`, annotated by `graphs.profile`): one node per captured
node except get_attr nodes (a parameter or buffer belongs to the nodes that read it:
their `params`, so they share a device), keyed by the fx node name. A node whose value
nothing reads (BatchNorm's counter update, an unused input) has a 0-byte edge to the
next op of its module, so it belongs to its layer.
  graph attrs: `name` (workload), `fingerprint` (str), `colocate` (list of lists of
      node names that must share a device, e.g. users of a tied weight),
      `granularity` ("op", or "module" when capture fell back to coarser grain),
      `leaf_paths` (module paths traced as leaves), `capture` ({"method": "export" or
      "fx", "leaf_paths": [...], "inputs": [{"shape": [...], "dtype": "float32"}, ...]}:
      how to capture the same graph again), `tensor_names` (every state_dict name),
      `batch_size` (rows of the example batch: its first tensor input's length along
      its batch dimension, the workload's `batch_dims` else 0, as
      graphs.capture.input_batch_dims reads them; absent without a tensor input); after
      profiling `device_kinds`, `microbatch_step_ms_by_kind` ({kind: {m: m x ms of a
      whole training step at batch/m}} for m in 1, 2, 4, 8 where the batch divides and
      the model runs), `microbatch_step_ms` (the first kind's table),
      `microbatch_absent` ({m: why the first kind's table has no step at m}) and
      `profile_scale` ({kind: the factor every node's time was scaled by so that they
      add up to a measured whole step}), `whole_step_spread` ({kind: the least of the
      whole steps timed at the full batch over their median, <= 1}).
  node attrs: `op` (fx op), `target` (str; an aten overload such as
      "aten.linear.default" for export captures), `module` (owning module's qualified
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
      group ids that must share a device), and the OpGraph's `batch_size`,
      `microbatch_step_ms`, `microbatch_step_ms_by_kind`, `microbatch_absent`, `profile_scale` and
      `whole_step_spread` where it has them (graphs.group.COPIED_ATTRS: bounds and the
      simulator read them there).
  node attrs: `name` (readable: a module path), `members` (list of op node names),
      `fwd_ms`, `bwd_ms`, `opt_ms` (dict kind -> ms, sums), `param_bytes`, `grad_bytes`,
      `opt_bytes`, `act_bytes`, `out_bytes` (sums), `op_mix` (dict op_type -> count).
  edge attrs: `bytes` (sum over the op edges between the two groups).
"""
