"""``moshi-ttt demo``: the long-context benchmarks a user runs to see whether a memory helps.

- ``realdata``: the default: real text (or token shards) nobody generated, every row a user
  would compare (the base, longer windows, LoRA, dynamic evaluation, the TTT retrofit and its
  controls), read by ``corpus``.
- ``markov`` (``--task markov``): the mechanism check, a fresh Markov chain per sequence
  (``markov_task``) whose memory is a bigram table.
"""
