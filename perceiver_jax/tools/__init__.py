"""The tools on a trained workdir: `--mode=eval` (`evaluate.py`), `predict`
and `attention` (maps), all from the weights training tested
(`trained.py`); and before training, `--mode=check_data`
(`check_data.py`: does every record decode?). Tools sit on top: they
import `model`, `data` and `training`; nothing imports them.
"""
