"""The Perceiver paper's ImageNet model and recipe (Jaegle et al. 2021).

Command (writes to runs/imagenet_perceiver; `--workdir=DIR` to choose):
  python main.py --config=configs/imagenet_perceiver.py
A shrunk model on the same recipe, for tests (`get_config('test')`):
  python main.py --config=configs/imagenet_perceiver.py:test

Model, as the paper gives it: 224 x 224 crops fed per pixel (patch_size 1,
50,176 inputs), each pixel's 3 values concatenated with 64-band Fourier
features of its (row, col) (max resolution 224, raw position included:
3 + 2 * (2 * 64 + 1) = 261 input channels); a 512 x 1024 latent array
(truncated-normal init, stddev 0.02); 8 cross-attends with 1 head, each
followed by a 6-block latent Transformer with 8 heads of 1024 / 8 = 128;
MLP widening 1 everywhere (`ffn_units=(1024, 1024)`: Dense(1024), GELU,
Dense(1024) in every block); pre-LN residuals in the cross-attends too
(as in DeepMind's released code); the mean over the latents then one
linear layer to the 1000 classes; no dropout. Weights are shared
as the paper's counts imply: one latent Transformer serves all 8
iterations, the first cross-attend has its own weights and one
cross-attend serves the other 7 (`weight_sharing='first_cross_attend'`).

Recipe, as the paper gives it: LAMB at learning rate 4e-3 for 120 epochs,
divided by 10 at epochs 84, 102 and 114, no warm-up (the paper names
none, and LAMB's per-layer trust ratio bounds the first updates);
RandAugment (2 ops at magnitude 9 on timm's scale are this config's
choice). Where the paper is silent we take the Perceiver IO paper's
ImageNet values: global batch 1024, weight decay 0.1 (on Dense kernels
only: not biases, LayerNorms or the latent array; the Fourier features
have no parameters) and gradients clipped to global norm 10. Early
stopping waits out the whole schedule, and the weights tested at the end
(and those a fine-tuning run starts from) are the final ones, as the paper
reports them (`restore_best_weights=False`), not those of the epoch with
the lowest loss on the 1% validation split.

Parameters (tests/model/test_imagenet_perceiver.py computes them with
`jax.eval_shape` and derives them by hand): 44,912,254, the paper's
"44.9M". Unshared (`weight_sharing='none'`) 326,241,856, the paper's
"326.2M"; 'all' 42,135,859; 'first_iteration' 82,722,430. These match the
paper only because the cross-attention works at the inputs' width, as
DeepMind's released Perceiver code does by default (its cross-attention's
q, k and v widths default to the inputs' channels; here
`cross_attention_width='input'`):
no projection of the pixels, then q (1024 -> 261), k and v (261 -> 261)
and an output projection (261 -> 1024): 672,577 weights per cross-attend.
At the seed's widths the pixels are first projected 261 -> 1024 (268,288
weights) and q, k, v and the output are 1024 -> 1024 (4,198,400 per
cross-attend, with 1024-wide data LayerNorms): 52,235,240 parameters.

FLOPs per 224 x 224 image, forward, counted by `benchmarks/flops.py` (every
matmul, multiply and add counted separately, tests/benchmarks/test_flops.py
checks them by hand): 706.3 G as the model is written (every cross-attend
projecting its own keys and values, in the factored order), against the
paper's 707.2 G "multiply and add counted separately". The paper does not
say what its last 0.9 G (0.13%) are; they are not matmuls, and elementwise
work such as the softmax over 8 x 512 x 50,176 logits is of that size.
The device does less. With `attention_form='auto'` the single-head
cross-attention runs folded (`W_q W_k^T`, `W_v W_o` first), which needs no
key or value projections at all: 596.9 G ('total'), so about 3 x 596.9 G
= 1.79 TFLOP per trained image. In Keras' factored order XLA would compute
the keys and values of the 7 shared cross-attends once, though their
gradients per cross-attend: 678.9 G ('factored_total', a third of the
step's count). The cross-attention weights are 512 x 50,176 per image
and cross-attend (103 MB in float32), so batch 1024 needs many devices
(the paper's own setup is not stated), or `remat`.

Differences from the paper's implementation that change no count: GELU is
exact (erf) where DeepMind's code uses the tanh approximation; Dense
kernels are glorot-uniform (the seed's) where DeepMind's are variance
scaled; the crops and the validation split are the data pipeline's.

Expected result: not yet measured. Nothing of this has been trained here;
the paper reports 78.0% top-1 on the ImageNet validation set.
"""

from configs import cifar100


def get_config(arg=''):
  """Returns the paper's ImageNet setup; `arg='test'` shrinks the model.

  Args:
    arg: '' (the paper's sizes) or 'test': the same options and recipe on a
      tiny per-pixel model and a 4-epoch schedule, on mock data, that
      trains on a CPU in about a minute.
  """
  if arg not in ('', 'test'):
    raise ValueError(f"get_config takes '' or 'test', got {arg!r}")
  config = cifar100.get_config()
  config.dataset = 'imagenet2012'
  config.image_size = 224

  # Data (data/; see configs/cifar100.py and README). The test split
  # follows the dataset ('auto'): on ImageNet its labelled held-out set,
  # tfds 'validation' (50,000 images), and 'test' on data such as CIFAR
  # when this config fine-tunes there. 1% of 'train' (12,812 images)
  # validates each epoch. Inception crops and flips on the host, streamed
  # from ArrayRecord files.
  config.test_split = 'auto'
  config.validation_split = 0.01
  config.host_crop = 'inception'
  config.eval_crop_fraction = 0.875  # Resize to 256, centre crop 224.
  config.device_augment = 'none'
  config.data_storage = 'auto'  # Variable-size images: streamed.
  config.normalization_examples = 10000

  # Model (model/perceiver.py; see configs/cifar100.py).
  config.patch_size = 1
  config.position_encoding = 'fourier'
  config.fourier_num_bands = 64
  config.fourier_max_resolution = 224
  config.fourier_mode = 'concat'
  config.cross_attention_width = 'input'
  config.num_cross_heads = 1
  config.cross_attention_residual = 'pre_norm'
  config.latent_dim = 512
  config.projection_dim = 1024
  config.latent_init = 'truncated_normal'
  config.num_heads = 8
  config.latent_head_width = 'split'
  config.ffn_units = (1024, 1024)  # Widening 1: Dense + GELU + Dense.
  config.num_transformer_blocks = 6
  config.num_iterations = 8
  config.weight_sharing = 'first_cross_attend'
  config.decoder = 'mean'
  config.classifier_units = ()  # One linear layer.
  config.logits_dropout = False
  config.dropout_rate = 0.0
  config.attention_dropout_rate = 0.0

  # Recipe (training/recipe.py; see configs/cifar100.py).
  config.batch_size = 1024
  config.num_epochs = 120
  config.learning_rate = 4e-3
  config.lr_schedule = 'step'
  config.lr_decay_epochs = (84, 102, 114)
  config.lr_decay_factor = 0.1
  config.warmup_epochs = 0
  config.weight_decay = 0.1
  config.weight_decay_mask = 'kernels'
  config.grad_clip_norm = 10.0
  config.randaugment_num_ops = 2
  config.randaugment_magnitude = 9.0
  config.early_stopping.patience = config.num_epochs
  # The paper reports the end of its schedule: the final test, the tools
  # and fine-tuning (init_from) use the last weights, not the epoch with
  # the best loss on the 1% validation split.
  config.early_stopping.restore_best_weights = False

  if arg == 'test':
    config.mock_data = True
    config.mock_num_examples = 64
    # tfds' mock data is served from memory, as whole images.
    config.host_crop = 'none'
    config.device_augment = 'seed'
    config.image_size = 16
    config.fourier_num_bands = 4
    config.fourier_max_resolution = 16
    config.latent_dim = 8
    config.projection_dim = 32
    config.num_heads = 4
    config.ffn_units = (32, 32)
    config.num_transformer_blocks = 1
    config.num_iterations = 3  # Cross-attend 1 own, 2 and 3 shared.
    config.batch_size = 16
    config.num_epochs = 4
    config.lr_decay_epochs = (2, 3)
    config.early_stopping.patience = config.num_epochs
    config.log_every_steps = 4
  return config
