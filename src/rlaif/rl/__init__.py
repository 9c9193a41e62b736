"""Reinforcement-learning math as small, pure, typed functions (no models, no I/O).

- :mod:`rlaif.rl.advantages`: masked statistics, whitening, GAE, running reward moments;
- :mod:`rlaif.rl.losses`: PPO clipped surrogate, clipped value loss, entropy, log-probs;
- :mod:`rlaif.rl.kl`: per-token KL estimators (k1, k2, k3) and the fixed/adaptive KL controllers;
- :mod:`rlaif.rl.rollout`: the named container for one PPO batch, with tensor shapes.

Every tensor function takes a ``mask`` (1 for real response tokens, 0 for padding) so that padded
positions never leak into a mean, a variance or a return.
"""
