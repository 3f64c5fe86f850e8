"""The tools on a trained workdir: --mode=eval, predict and attention.

One tiny fake-data run is trained in-process per test session
(`conftest.py`); the tools then read its workdir as a user's command would.
"""

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import types
import zlib

from configs import fake_data
import numpy as np
from PIL import Image
import pytest

from perceiver_jax import errors
from perceiver_jax.data import datasets
from perceiver_jax.data import host_transforms
from perceiver_jax.tools import attention_maps
from perceiver_jax.tools import evaluate
from perceiver_jax.tools import predict
from perceiver_jax.tools import trained as trained_lib
from perceiver_jax.training import checkpointing
from perceiver_jax.training import recipe
from tests.support import ROOT
from tests.support import subprocess_env
from tests.tools.conftest import MOCK_EXAMPLES

def test_eval_reproduces_results_json_on_every_test_example(workdir, capsys):
  path, results = workdir
  capsys.readouterr()
  evaluated = evaluate.run(str(path))
  out = capsys.readouterr().out
  with open(path / 'results.json') as f:
    saved = json.load(f)
  for key in ('test_loss', 'test_accuracy', 'test_top5_accuracy'):
    assert evaluated[key] == pytest.approx(saved[key], rel=1e-6, abs=1e-9)
    assert saved[key] == pytest.approx(results[key])
  assert evaluated['num_examples'] == MOCK_EXAMPLES
  assert evaluated['checkpoint'] == 'best'
  assert f'(EMA weights) of {path} on {MOCK_EXAMPLES} test examples' in out
  assert (f'Test accuracy: {round(saved["test_accuracy"] * 100, 2)}%'
          in out.splitlines())
  assert (f'Test top 5 accuracy: '
          f'{round(saved["test_top5_accuracy"] * 100, 2)}%' in out.splitlines())


def _truncate_arrays(checkpoint):
  for root, _, files in os.walk(checkpoint / 'state'):
    if os.path.basename(root) == 'd':
      for name in files:
        with open(os.path.join(root, name), 'r+b') as f:
          f.truncate(0)


def test_tools_load_the_weights_training_tested_and_skip_damage(
    workdir, trained, tmp_path, caplog):
  source, _ = workdir
  path = tmp_path / 'run'
  shutil.copytree(source, path)
  # A later, non-best checkpoint: as if one more epoch had not improved.
  manager = checkpointing.create_manager(path / 'checkpoints', max_to_keep=5)
  best = manager.latest_step()
  assert best == trained.step
  checkpointing.save(manager, best + 1, trained.state,
                     {'best_step': best, 'epoch': 2}, is_best=False)
  manager.wait_until_finished()
  manager.close()
  load = lambda: trained_lib.load(path, mesh=trained_lib.single_device_mesh())
  assert (load().step, load().checkpoint) == (best, 'best')
  config = json.loads((path / 'config.json').read_text())
  config['early_stopping']['restore_best_weights'] = False
  (path / 'config.json').write_text(json.dumps(config))
  assert (load().step, load().checkpoint) == (best + 1, 'latest')
  # A damaged choice is reported and the newest readable one used instead.
  config['early_stopping']['restore_best_weights'] = True
  (path / 'config.json').write_text(json.dumps(config))
  _truncate_arrays(path / 'checkpoints' / str(best))
  with caplog.at_level('WARNING'):
    trained = load()
  assert (trained.step, trained.checkpoint) == (best + 1, 'last readable')
  assert f'The best checkpoint {path / "checkpoints"}/{best} is unreadable' in (
      caplog.text)


def test_tools_use_the_ema_weights_when_the_run_kept_them(trained):
  assert trained.uses_ema
  images, _ = attention_maps.first_test_examples(trained.config, 4)
  x = trained.preprocess(images)
  apply = lambda params: np.asarray(trained.model.apply(
      {'params': params}, x, train=False))
  np.testing.assert_allclose(trained.logits(images),
                             apply(trained.state.ema_params), rtol=1e-5,
                             atol=1e-6)
  assert not np.allclose(apply(trained.state.params),
                         apply(trained.state.ema_params), atol=1e-4)
  plain = types.SimpleNamespace(params='raw', ema_params=None)
  assert recipe.eval_params(plain) == 'raw'


def _write_images(directory):
  rng = np.random.default_rng(0)
  files = {
      'rgb_odd.png': Image.fromarray(
          rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)),
      'gray_tall.jpg': Image.fromarray(
          rng.integers(0, 256, (100, 21), dtype=np.uint8), mode='L'),
      'rgba_tiny.png': Image.fromarray(
          rng.integers(0, 256, (7, 9, 4), dtype=np.uint8), mode='RGBA'),
      'palette.png': Image.fromarray(
          rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).convert('P'),
      'native.png': Image.fromarray(
          rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
  }
  paths = []
  for name, image in files.items():
    paths.append(str(directory / name))
    image.save(paths[-1])
  return paths


def _whole(height, width, channels):
  return host_transforms.HostTransform('none', height, width, channels)


def test_load_image_converts_to_the_datasets_images(tmp_path):
  paths = _write_images(tmp_path)
  for path in paths:
    image = predict.load_image(path, _whole(32, 32, 3))
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert predict.load_image(path, _whole(28, 28, 1)).shape == (28, 28, 1)
  # A native-size lossless image reaches the model unchanged.
  np.testing.assert_array_equal(
      predict.load_image(paths[-1], _whole(32, 32, 3)),
      np.asarray(Image.open(paths[-1])))


def test_load_image_takes_the_evaluation_view_of_the_run(tmp_path):
  # With Inception crops evaluation takes the centre of the image, resized
  # to image_size; predict must see the same view of the same file.
  path = str(tmp_path / 'wide.png')
  image = np.random.default_rng(0).integers(0, 256, (30, 50, 3), np.uint8)
  Image.fromarray(image).save(path)
  crop = host_transforms.HostTransform('inception', 16, 16, 3)
  with open(path, 'rb') as f:
    want = crop.eval(f.read())
  np.testing.assert_array_equal(predict.load_image(path, crop), want)
  assert not np.array_equal(want, predict.load_image(path, _whole(16, 16, 3)))


def test_predict_prints_top5_names_and_probabilities(workdir, tmp_path,
                                                     capsys):
  path, _ = workdir
  paths = _write_images(tmp_path)
  capsys.readouterr()
  predictions = predict.run(str(path), paths)
  out = capsys.readouterr().out
  with open(path / 'class_names.json') as f:
    names = json.load(f)
  assert len(names) == 100
  blocks = out.split('\n' + tmp_path.as_posix())
  assert len(predictions) == len(paths) == len(blocks) - 1
  for prediction, file in zip(predictions, paths):
    assert prediction.path == file
    lines = out[out.index(file + ':\n'):].splitlines()[1:6]
    parsed = [re.fullmatch(r'  (\d)\. (\S+) +(\d+\.\d\d)%', l) for l in lines]
    assert all(parsed), lines
    assert [int(m[1]) for m in parsed] == [1, 2, 3, 4, 5]
    assert [m[2] for m in parsed] == list(prediction.classes)
    assert all(m[2] in names for m in parsed)
    probs = prediction.probabilities
    assert list(probs) == sorted(probs, reverse=True)
    assert 0 < sum(probs) <= 1 + 1e-9
    np.testing.assert_allclose([float(m[3]) for m in parsed],
                               np.asarray(probs) * 100, atol=0.006)


def test_predict_probabilities_are_the_models(trained, tmp_path):
  paths = _write_images(tmp_path)
  images = predict.load_images(paths, trained.config, trained.info)
  probs = predict.softmax(trained.logits(images))
  for prediction, p in zip(predict.predict(trained, paths, k=100), probs):
    np.testing.assert_allclose(prediction.probabilities, np.sort(p)[::-1],
                               rtol=1e-6)
    assert sum(prediction.probabilities) == pytest.approx(1.0)


def test_predict_errors_name_the_problem(workdir, tmp_path):
  path, _ = workdir
  good = _write_images(tmp_path)[0]
  with pytest.raises(ValueError, match=r'Cannot read image .*missing\.png: '
                     'No such file'):
    predict.run(str(path), [good, str(tmp_path / 'missing.png')])
  text = tmp_path / 'notes.png'
  text.write_text('not an image')
  with pytest.raises(ValueError, match='is not an image Pillow can decode'):
    predict.run(str(path), [str(text)])
  bare = tmp_path / 'no_checkpoints'
  bare.mkdir()
  with pytest.raises(ValueError, match='has no config.json'):
    predict.run(str(bare), [good])
  for name in ('config.json', 'normalization.json'):
    shutil.copy(path / name, bare / name)
  (bare / 'checkpoints').mkdir()
  with pytest.raises(ValueError, match='has no checkpoint'):
    predict.run(str(bare), [good])
  with pytest.raises(ValueError, match='cannot be overridden'):
    trained_lib.load_config(path, {'latent_dim': 4})


def test_tools_ignore_how_training_split_its_batches(tmp_path):
  """An evaluation batch need not split into training's micro-batches."""
  config = fake_data.get_config()
  config.grad_accum_steps = 4
  (tmp_path / 'config.json').write_text(json.dumps(config.to_dict()))
  loaded = trained_lib.load_config(tmp_path, {'batch_size': 6})
  assert loaded.batch_size == 6 and 'grad_accum_steps' not in loaded


def _png_header(width, height):
  """A PNG that declares `width` x `height` RGB pixels and holds none."""
  def chunk(kind, data):
    body = kind + data
    return (struct.pack('>I', len(data)) + body +
            struct.pack('>I', zlib.crc32(body)))
  return (b'\x89PNG\r\n\x1a\n' +
          chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0))
          + chunk(b'IEND', b''))


@pytest.mark.parametrize('side', [30000, 10000])
def test_decompression_bombs_are_refused_by_name(tmp_path, side):
  # 30000^2 is past Pillow's error threshold, 10000^2 only past its warning.
  path = tmp_path / 'bomb.png'
  path.write_bytes(_png_header(side, side))
  assert side * side > predict.MAX_IMAGE_PIXELS
  with pytest.raises(errors.InputError,
                     match=f'{re.escape(str(path))} declares more than '
                     '89,478,485 pixels'):
    predict.load_image(str(path), _whole(32, 32, 3))
  # A small one without pixel data reaches the decoder, which fails.
  path.write_bytes(_png_header(4, 4))
  with pytest.raises(errors.InputError, match='Cannot read image .*bomb.png'):
    predict.load_image(str(path), _whole(32, 32, 3))


def test_cli_errors_are_one_paragraph(workdir, tmp_path):
  path, _ = workdir
  env = subprocess_env(devices=1)
  proc = subprocess.run(
      [sys.executable, 'main.py', '--mode=predict', f'--workdir={path}',
       f'--images={tmp_path / "missing.jpg"}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
      check=False)
  assert proc.returncode == 1
  assert 'Error: Cannot read image' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_attention_maps_are_distributions_over_patches(trained):
  images, _ = attention_maps.first_test_examples(trained.config, 3)
  grid = trained.config.image_size // trained.config.patch_size
  latents = trained.config.latent_dim
  for iteration in ('last', 'mean', 1):
    maps, logits = attention_maps.cross_attention_maps(trained, images,
                                                       iteration)
    assert maps.shape == (3, latents, grid, grid)
    np.testing.assert_allclose(maps.sum(axis=(2, 3)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(maps.mean(axis=1).sum(axis=(1, 2)), 1.0,
                               rtol=1e-5)
    assert (maps >= 0).all()
  # The logits are the model's, as predict computes them.
  np.testing.assert_allclose(logits, trained.logits(images), rtol=1e-5,
                             atol=1e-5)
  with pytest.raises(ValueError, match='last, mean or an iteration'):
    attention_maps.cross_attention_maps(trained, images, 3)


def test_attention_png_layout(workdir, tmp_path, capsys):
  path, _ = workdir
  output = tmp_path / 'maps.png'
  grid = attention_maps.run(str(path), num_images=3, output=str(output),
                            num_latents=4, tile=40)
  out = capsys.readouterr().out
  assert f'Wrote {output}' in out and 'last cross-attend' in out
  assert grid.rows == 3 and grid.cols == 6
  assert grid.latents == (0, 2, 5, 7)  # Evenly spaced over 8 latents.
  with Image.open(output) as image:
    assert image.format == 'PNG' and image.mode == 'RGB'
    assert image.size == (6 * 40, attention_maps.HEADER + 3 * 40)
    pixels = np.asarray(image)
  # The first tile of each row is its test image, as the dataset stores it.
  config = trained_lib.load_config(path)
  images, _ = attention_maps.first_test_examples(config, 3)
  for row, test_image in enumerate(images):
    top = attention_maps.HEADER + row * 40
    expected = attention_maps.image_tile(test_image, 40)
    np.testing.assert_allclose(pixels[top:top + 39, :39],
                               np.round(expected[:39, :39]), atol=1)
  with pytest.raises(ValueError, match='--num_images=200 must be between'):
    attention_maps.run(str(path), num_images=200,
                       output=str(tmp_path / 'x.png'))


def test_predict_reads_the_config_and_builds_the_dataset_once(
    workdir, tmp_path, monkeypatch):
  path, _ = workdir
  calls = {'config': 0, 'builder': 0}
  load_config, builder = trained_lib.load_config, datasets.tfds.builder

  def counting(name, real):
    def call(*args, **kwargs):
      calls[name] += 1
      return real(*args, **kwargs)
    return call

  monkeypatch.setattr(trained_lib, 'load_config',
                      counting('config', load_config))
  monkeypatch.setattr(datasets.tfds, 'builder', counting('builder', builder))
  predict.run(str(path), _write_images(tmp_path)[:1])
  assert calls == {'config': 1, 'builder': 1}
