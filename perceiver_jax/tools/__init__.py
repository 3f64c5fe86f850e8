"""The tools on a trained workdir: `--mode=eval` (`evaluate.py`), `predict`
and `attention` (maps), all from the weights training tested
(`trained.py`). Tools sit on top: they import `model`, `data` and
`training`; nothing imports them.
"""
