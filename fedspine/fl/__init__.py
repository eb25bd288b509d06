"""Federated runtime: device profiles and the round-time model, the client step, strategies, the server
round, the world that server and devices share, the runners, the simulator and checkpoints;
``fedspine.fl.build.check`` refuses a bad run config before any of it loads a model or data.

``fedspine.fl.devices`` and ``fedspine.fl.time_model`` are numpy only (the server and the bandit
use them without torch). This package file imports nothing, so ``import fedspine.fl`` stays light.
"""
