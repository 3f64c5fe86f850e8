"""Perceiver IO's ImageNet classifiers (Jaegle et al. 2022), as published.

Commands (the argument picks the variant):
  python main.py --mode=import --source=HF_FOLDER --workdir=DIR
  python main.py --config=configs/imagenet_perceiver_io.py:conv
  python main.py --config=configs/imagenet_perceiver_io.py:test

DeepMind published three ImageNet classifiers (top-1 on ImageNet's
validation set as the Perceiver IO paper reports it): learned position
embeddings ('learned', 72.7%), per-pixel Fourier features ('fourier',
79.0%) and a convolutional stem ('conv', 82.1%), as haiku checkpoints and
as HuggingFace's deepmind/vision-perceiver-{learned,fourier,conv}. The
model fields are those HuggingFace's `config.json` gives them
(`PUBLISHED`: the values HuggingFace's convert_perceiver_haiku_to_pytorch.py
sets; every other field is PerceiverConfig's default), read by
`perceiver_jax/convert/huggingface.py`, the same reading `--mode=import`
applies to a downloaded checkpoint, so an imported workdir and this config
build the same model (tests/convert check it). `:test` is the 'conv'
variant shrunk (16 x 16 images, 8 latents of 32) on mock data.

All three: a 512 x 1024 latent array reads the inputs in ONE cross-attend
(1 head, q, k and v at the inputs' width, the query's residual), then one
block of 6 self-attention layers (8 heads of 128, MLP widening 1) is applied
8 times with the same weights (their num_blocks x num_self_attends_per_block;
here `cross_attend='first_iteration'`, `weight_sharing='all'`); a learned
query reads the latents in a cross-attention block (`decoder=
'perceiver_io'`) and one linear layer gives the 1000 logits. LayerNorm
epsilon 1e-5 and exact GELU, as HuggingFace's PyTorch port computes them
(DeepMind's haiku code uses the tanh approximation: `gelu_approximate`).
Inputs, 224 x 224:
- 'learned': a 1x1 convolution of the pixels to 256 channels, joined by a
  learned 256-wide embedding per pixel projected by a 256 x 256 Dense:
  50,176 inputs of 512.
- 'fourier': the pixels joined by 64-band Fourier features (max resolution
  224): 50,176 inputs of 261.
- 'conv': a 7x7 convolution (stride 2, 64 channels, no bias), BatchNorm
  (frozen: its statistics never train), ReLU and a 3x3 max-pool (stride 2),
  then 64-band Fourier features (max resolution 56): 55 x 55 = 3,025
  inputs of 322 with HuggingFace's padding (`conv_stem_padding=
  'huggingface'`; haiku's SAME padding gives 56 x 56).

Parameters (tests/convert/test_huggingface.py counts them against
HuggingFace's model of the same config): learned 62,255,848; fourier
48,440,627; conv 48,646,650 (HuggingFace's 48,646,522 parameters plus the
BatchNorm's 128 running statistics, parameters here).

FLOPs per 224 x 224 image, forward, counted by `benchmarks/flops.py`
(every matmul, 2 per multiply-add; convolution included; elementwise work
not): learned 471.5 G, fourier 406.1 G, conv 369.2 G as written (factored
order). The device does less with `attention_form='auto'` at batch 1024
('total': learned 416.7 G, fourier 390.3 G, conv 365.8 G). The 48 latent
self-attention layers (512 latents of 1024) are 361 G of each; the
cross-attend over 50,176 inputs makes most of the rest of the first two.

The recipe is configs/imagenet_perceiver.py's (the 2021 paper's), not
Perceiver IO's own; nothing here has been trained. Fine-tune the imported
weights with `--config.init_from=DIR` (README, "Perceiver IO's published
weights").
"""

from configs import imagenet_perceiver
from perceiver_jax.convert import huggingface

VARIANTS = ('learned', 'fourier', 'conv')
# HuggingFace's config.json of deepmind/vision-perceiver-<variant>, the
# fields HuggingFace's conversion script sets (the rest are defaults).
_COMMON = dict(num_latents=512, d_latents=1024, num_blocks=8,
               num_self_attends_per_block=6, num_cross_attention_heads=1,
               num_self_attention_heads=8, qk_channels=None, v_channels=None,
               num_labels=1000)
PUBLISHED = {
    'learned': dict(_COMMON, d_model=512, image_size=224, architectures=[
        'PerceiverForImageClassificationLearned']),
    'fourier': dict(_COMMON, d_model=261, architectures=[
        'PerceiverForImageClassificationFourier']),
    'conv': dict(_COMMON, d_model=322, architectures=[
        'PerceiverForImageClassificationConvProcessing']),
}


def get_config(arg='conv'):
  """Returns a published classifier's config; `arg='test'` shrinks 'conv'.

  Args:
    arg: 'learned', 'fourier', 'conv' or 'test'.
  """
  if arg not in VARIANTS + ('test',):
    raise ValueError(f"get_config takes one of {VARIANTS + ('test',)}, got "
                     f'{arg!r}')
  config = imagenet_perceiver.get_config('test' if arg == 'test' else '')
  published = PUBLISHED['conv' if arg == 'test' else arg]
  _, fields = huggingface.config_fields(published)
  for name, value in fields.items():
    setattr(config, name, value)
  if arg == 'test':
    config.image_size = 16
    config.latent_dim = 8
    config.projection_dim = 32
    config.num_heads = 4
    config.ffn_units = (32, 32)
    config.num_transformer_blocks = 2
    config.num_iterations = 3
    config.preprocessor_channels = 8
    config.fourier_num_bands = 4
    config.fourier_max_resolution = 4
  return config
