"""storage.py: how many CPUs the workers may use, from faked system files."""

import os

import pytest

from configs import fake_data
from perceiver_jax.data import storage


def test_cpu_limit_is_the_affinity_capped_by_every_quota():
  assert storage.cpu_limit(240) == 240
  assert storage.cpu_limit(240, [(1600000, 100000)]) == 16
  assert storage.cpu_limit(8, [(1600000, 100000)]) == 8  # Affinity smaller.
  assert storage.cpu_limit(240, [(150000, 100000)]) == 2  # 1.5 CPUs.
  assert storage.cpu_limit(240, [(-1, 100000), (None, 100000)]) == 240
  assert storage.cpu_limit(240, [(800000, 100000), (400000, 100000)]) == 4
  assert storage.cpu_limit(240, [(10000, 100000)]) == 1


def _write(root, path, text):
  path = os.path.join(root, path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(text)


def test_cgroup_v2_quota_along_the_path_and_its_ancestors(tmp_path):
  root = str(tmp_path / 'cgroup')
  _write(root, 'cpu.max', 'max 100000\n')
  _write(root, 'jobs/cpu.max', '800000 100000\n')
  _write(root, 'jobs/trainer/cpu.max', 'max 100000\n')
  membership = str(tmp_path / 'self_cgroup')
  _write(str(tmp_path), 'self_cgroup', '0::/jobs/trainer\n')
  assert storage.cgroup_quotas(root, membership) == [(800000, 100000)]


def test_cgroup_v1_quota_of_the_cpu_controller(tmp_path):
  root = str(tmp_path / 'cgroup')
  _write(root, 'cpu,cpuacct/docker/abc/cpu.cfs_quota_us', '400000\n')
  _write(root, 'cpu,cpuacct/docker/abc/cpu.cfs_period_us', '100000\n')
  _write(root, 'cpu,cpuacct/cpu.cfs_quota_us', '-1\n')
  _write(root, 'cpu,cpuacct/cpu.cfs_period_us', '100000\n')
  _write(str(tmp_path), 'self_cgroup',
         '4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n1:name=systemd:/\n')
  quotas = storage.cgroup_quotas(root, str(tmp_path / 'self_cgroup'))
  assert sorted(quotas) == [(-1, 100000), (400000, 100000)]
  assert storage.cpu_limit(240, quotas) == 4


def test_inside_a_container_its_own_cgroup_is_the_top(tmp_path):
  # /proc/self/cgroup names the host's path, which the container's
  # /sys/fs/cgroup does not have: the quota at the top is the container's.
  root = str(tmp_path / 'cgroup')
  _write(root, 'cpu.max', '200000 100000\n')
  _write(str(tmp_path), 'self_cgroup', '0::/system.slice/docker-abc.scope\n')
  assert storage.cgroup_quotas(root, str(tmp_path / 'self_cgroup')) == [
      (200000, 100000)]


def test_no_cgroup_files_no_quota(tmp_path):
  assert storage.cgroup_quotas(str(tmp_path / 'none'),
                               str(tmp_path / 'missing')) == []


@pytest.mark.parametrize('data_workers, cpus, expected', [
    (-1, 240, 239), (-1, 16, 15), (-1, 1, 1), (3, 240, 3), (0, 16, 0)])
def test_automatic_workers_are_the_usable_cpus_but_one(data_workers, cpus,
                                                       expected):
  config = fake_data.get_config()
  config.data_workers = data_workers
  assert storage.num_workers(config, cpus=cpus) == expected


def test_automatic_workers_count_the_usable_cpus(monkeypatch):
  monkeypatch.setattr(storage, 'usable_cpus', lambda: 16)
  monkeypatch.setattr(os, 'cpu_count', lambda: 240)
  config = fake_data.get_config()
  config.data_workers = -1
  assert storage.num_workers(config) == 15


def test_usable_cpus_are_the_affinity_and_the_quota(monkeypatch):
  monkeypatch.setattr(os, 'cpu_count', lambda: 240)
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(12)),
                      raising=False)
  monkeypatch.setattr(storage, 'cgroup_quotas', lambda: [])
  assert storage.usable_cpus() == 12
  monkeypatch.setattr(storage, 'cgroup_quotas', lambda: [(400000, 100000)])
  assert storage.usable_cpus() == 4
