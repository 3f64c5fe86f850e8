"""CIFAR-100 fine-tuned from an imported Perceiver IO ImageNet classifier.

Commands (the argument picks the published variant; 'conv' by default):
  python main.py --mode=import --source=vision-perceiver-conv \
      --workdir=runs/perceiver_io_conv
  python main.py --config=configs/cifar100_finetune.py:conv \
      --config.init_from=runs/perceiver_io_conv --workdir=runs/cifar100_ft
A tiny copy for tests (`:test`, the model of `TEST_PUBLISHED`, 32 x 32):
  python main.py --config=configs/cifar100_finetune.py:test \
      --config.init_from=IMPORTED_TINY_WORKDIR

The model is the imported one (configs/imagenet_perceiver_io.py's fields
for the variant, which `--mode=import` of a HuggingFace checkpoint writes
too, so `init_from` accepts it; from DeepMind's `.pystate` files add the
fields where their code computes otherwise, e.g.
`--config.gelu_approximate=True --config.conv_stem_padding=same` for
'conv': README, "DeepMind's haiku checkpoints"), with a new 100-class
output layer: transfer starts it afresh and
takes every other weight, the conv stem's frozen BatchNorm statistics
included. Inputs are normalised with the source's statistics (ImageNet's,
`init_normalization='source'`), as the weights were trained.

Resolution: `image_size` (default 224, the published models' size; CIFAR's
32 x 32 images are upsampled on the device). Another size needs no other
change: the conv and Fourier variants have no weight tied to the grid, and
the learned variant's position embedding is resampled to the new one
(README, "Fine-tuning at another resolution"). A smaller size saves little
here: FLOPs per image, forward, as written (`benchmarks/flops.py`, 100
classes):

  variant    224 x 224   128 x 128
  conv        369.2 G     366.9 G
  learned     471.5 G     400.5 G
  fourier     406.1 G     378.9 G

because 361 G of each is the latent Transformer (48 self-attention layers
over 512 latents of 1024), whatever the input size. A training step costs
about 3 x the forward, so an epoch (45,000 training images, the seed's
90/10 split) of 'conv' at 224 is 3 x 369.2 G x 45,000 = 5.0e16 FLOPs; at
an assumed 400 TFLOP/s sustained (not measured here) that is about 125 s.

Recipe, as fine-tuning codebases use it (big_vision's transfer configs):
SGD with momentum 0.9, global batch 512, learning rate 0.01 after a linear
warm-up over the first epoch, cosine decay to 0 over 10 epochs, no weight
decay, gradients clipped to global norm 1, no label smoothing, MixUp or
RandAugment; the seed's random flip and zoom on the device; the final
weights are tested (no early-stopping best).

Expected accuracy: not yet measured.
"""

from configs import imagenet_perceiver_io
from perceiver_jax.convert import huggingface

# The tiny HuggingFace conv classifier the tests build, save and import
# (tests/convert/test_importer.py); `:test` fine-tunes its import.
TEST_PUBLISHED = dict(
    num_latents=8, d_latents=32, d_model=322, num_blocks=2,
    num_self_attends_per_block=1, num_cross_attention_heads=1,
    num_self_attention_heads=4, num_labels=1000,
    architectures=['PerceiverForImageClassificationConvProcessing'])


def get_config(arg='conv'):
  """Returns the fine-tuning config of a published variant, or 'test'.

  Args:
    arg: 'learned', 'fourier', 'conv' or 'test'.
  """
  variants = imagenet_perceiver_io.VARIANTS + ('test',)
  if arg not in variants:
    raise ValueError(f'get_config takes one of {variants}, got {arg!r}')
  config = imagenet_perceiver_io.get_config('conv' if arg == 'test' else arg)
  if arg == 'test':
    _, fields = huggingface.config_fields(TEST_PUBLISHED)
    for name, value in fields.items():
      setattr(config, name, value)

  # Data: CIFAR-100 in memory, 45,000 train / 5,000 validation / test.
  config.dataset = 'cifar100'
  config.mock_data = False
  config.test_split = 'test'
  config.validation_split = 0.1
  config.host_crop = 'none'
  config.device_augment = 'seed'
  config.data_storage = 'auto'
  config.image_size = 224

  # Transfer: the imported run's weights and normalisation.
  config.init_from = None  # --config.init_from=IMPORTED_WORKDIR
  config.init_normalization = 'source'

  # Recipe.
  config.optimizer = 'sgd'
  config.momentum = 0.9
  config.batch_size = 512
  config.learning_rate = 0.01
  config.weight_decay = 0.0
  config.weight_decay_mask = 'all'
  config.grad_clip_norm = 1.0
  config.num_epochs = 10
  config.lr_schedule = 'warmup_cosine'
  config.warmup_epochs = 1
  config.min_learning_rate = 0.0
  config.label_smoothing = 0.0
  config.mixup_alpha = 0.0
  config.cutmix_alpha = 0.0
  config.randaugment_num_ops = 0
  config.ema_decay = 0.0
  config.dropout_rate = 0.0
  config.early_stopping.patience = config.num_epochs
  config.early_stopping.restore_best_weights = False

  if arg == 'test':
    config.image_size = 32
    config.batch_size = 8
    config.num_epochs = 1
    config.warmup_epochs = 0
    config.early_stopping.patience = 1
  return config
