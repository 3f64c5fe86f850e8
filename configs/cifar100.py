"""The Keras example's Perceiver on CIFAR-100, hyperparameters unchanged.

Command (writes to runs/cifar100; `--workdir=DIR` to choose):
  python main.py --config=configs/cifar100.py

Target: the Keras example's own result (its log, one V100): early stopping
after epoch 45 (best val_loss at epoch 30), test top-1 52.6% and top-5 80.9%.
Not yet measured with this code: no full CIFAR-100 run has been made here.
"""

import ml_collections
from ml_collections import config_dict


def get_config():
  """Returns the seed's configuration."""
  config = ml_collections.ConfigDict()

  # Data.
  config.dataset = 'cifar100'
  config.tfds_data_dir = config_dict.placeholder(str)
  config.validation_split = 0.1
  config.test_split = 'test'  # The tfds split tested at the end.
  # Use tfds mock data (random images, no download); for smoke runs and tests.
  config.mock_data = False
  config.mock_num_examples = 0
  # Where manually downloaded archives are (datasets that need them, e.g.
  # imagenet2012; see README).
  config.tfds_manual_dir = config_dict.placeholder(str)
  # 'memory' (decode once, keep in host memory), 'stream' (read ArrayRecord
  # files in worker processes) or 'auto' (memory while it fits: CIFAR).
  config.data_storage = 'auto'
  config.data_workers = -1  # Streaming workers; -1: one per usable CPU but one.
  # Host crop: 'none' (images as stored) or 'inception' (random-resized crop
  # and flip for training, resize and centre crop of this share to eval).
  config.host_crop = 'none'
  config.eval_crop_fraction = 0.875
  # Device augmentation of training images: 'seed' (flip and zoom, as the
  # Keras example) or 'none' (normalise and resize only).
  config.device_augment = 'seed'
  # Normalisation statistics from this many training examples (0: all).
  config.normalization_examples = 0

  # Optimisation (LAMB, as in the seed).
  config.learning_rate = 0.001
  config.weight_decay = 0.0001
  config.batch_size = 64
  config.num_epochs = 50
  config.seed = 0

  # Model.
  config.dropout_rate = 0.2
  config.attention_dropout_rate = 0.1
  config.image_size = 64  # Input images are resized to this size.
  config.patch_size = 2
  config.latent_dim = 256
  config.projection_dim = 256
  config.num_heads = 8
  config.ffn_units = (256, 256)
  config.num_transformer_blocks = 4
  config.num_iterations = 2
  # Hidden widths of the classifier head; its output width is the class count.
  config.classifier_units = (256,)
  # Glorot fans of the multi-head attention kernels as computed by the Keras
  # version the seed ran (2.7); 'keras3' gives Keras 3's larger init.
  config.attention_init = 'keras2'

  # Speed options; the defaults are the faithful float32 path.
  config.dtype = 'float32'  # Compute dtype ('bfloat16'); params stay float32.
  config.attention_impl = 'xla'  # jax.nn.dot_product_attention: 'cudnn' too.
  # Same function, fewer FLOPs: 'auto' folds W_q W_k^T and W_v W_o where that
  # is cheaper (the latent self-attention); 'factored' is Keras' order.
  config.attention_form = 'auto'
  # Dropout bits: 'hash' (counter-based, cheap) or 'threefry' (jax.random).
  config.dropout_bits = 'hash'
  config.remat = False  # Recompute block activations in the backward pass.
  # Split each batch into this many micro-batches inside the step and sum
  # their gradients: the same step in less memory (training/steps.py).
  # batch_size must be a multiple of it times the device count.
  config.grad_accum_steps = 1

  # Keras ReduceLROnPlateau(monitor='val_loss', factor=0.2, patience=3).
  config.plateau = ml_collections.ConfigDict(
      dict(factor=0.2, patience=3, min_delta=1e-4, cooldown=0, min_lr=0.0))
  # Keras EarlyStopping(monitor='val_loss', patience=15,
  # restore_best_weights=True); Keras' default min_delta for it is 0.
  config.early_stopping = ml_collections.ConfigDict(
      dict(patience=15, min_delta=0.0, restore_best_weights=True))

  # Start from the weights another run's training tested (its --workdir);
  # the class count may differ (the classifier's last layer starts afresh).
  config.init_from = config_dict.placeholder(str)

  # Checkpointing and logging.
  config.checkpoint_max_to_keep = 3
  # Also save every N steps inside an epoch (0: only at epoch ends).
  config.checkpoint_every_steps = 0
  config.log_every_steps = 50
  # jax.profiler trace of train steps (first, count) into WORKDIR/profile;
  # () or count 0: off. Step 1 compiles; see training/profiling.py.
  config.profile_steps = ()

  # ---- Perceiver paper options (model/perceiver.py); defaults: the seed. ----
  # 'learned' (the seed's position embedding) or 'fourier' (the paper's
  # fixed sin/cos features of each patch's (row, col) in [-1, 1]).
  config.position_encoding = 'learned'
  config.fourier_num_bands = 64  # Frequencies per axis, 1 .. max_res / 2.
  config.fourier_max_resolution = 0  # 0: the patch grid (image / patch).
  # 'concat': features join the patch values before the projection (paper);
  # 'add': their own Dense to projection_dim, added after the projection.
  config.fourier_mode = 'concat'
  # 'all' (seed: one cross-attention + Transformer for every iteration),
  # 'first_cross_attend' (the paper's: cross-attention 1 own, 2..T share
  # one; one Transformer), 'first_iteration' (iteration 1 own cross-attention
  # and Transformer, 2..T share) or 'none' (T sets).
  config.weight_sharing = 'all'
  # 0 (seed: one head, learned scalar scale, no output projection) or k
  # heads of projection_dim // k, 1/sqrt(head_dim), output projection.
  config.num_cross_heads = 0
  # 'latent' (seed: patches projected to projection_dim first) or 'input'
  # (paper: unprojected pixels + Fourier features; heads split their width).
  config.cross_attention_width = 'latent'
  # 'normalized' (seed: residuals add LayerNorm outputs) or 'pre_norm'.
  config.cross_attention_residual = 'normalized'
  # Latent heads 'full' (seed: each projection_dim wide) or 'split' (d / h).
  config.latent_head_width = 'full'
  # 'random_normal' (seed, stddev 0.05) or 'truncated_normal' (0.02).
  config.latent_init = 'random_normal'
  # 'mean' over latents (seed) or 'query' (Perceiver IO: a learned query
  # cross-attends the latents); then the classifier FFN.
  config.decoder = 'mean'
  config.logits_dropout = True  # Seed: Dropout after the classifier logits.
  # ---- End of Perceiver paper options. ----

  # ---- Recipe options beyond the seed (training/recipe.py, data/mixing.py,
  # randaugment.py); the defaults are the seed's exact behaviour. ----
  # 'plateau' (seed: ReduceLROnPlateau above), 'step' (below) or
  # 'warmup_cosine': per step, linear from 0 to learning_rate over
  # warmup_epochs, then cosine down to min_learning_rate at the end of
  # num_epochs (plateau then unused).
  config.lr_schedule = 'plateau'
  config.warmup_epochs = 0
  config.min_learning_rate = 0.0
  # 'step': learning_rate x lr_decay_factor at each of lr_decay_epochs
  # before num_epochs (later ones are logged and never happen), after
  # warmup_epochs of linear warm-up (plateau then unused).
  config.lr_decay_epochs = ()
  config.lr_decay_factor = 0.1
  config.label_smoothing = 0.0  # Train loss only; eval loss stays plain CE.
  # 'all' (seed) or 'kernels': decay only Dense kernels (no biases, norms,
  # scales, position embeddings, latent array, queries).
  config.weight_decay_mask = 'all'
  config.grad_clip_norm = 0.0  # Clip by global norm before LAMB; 0: off.
  # 'lamb' (seed), or for fine-tuning 'sgd' (with momentum; weight decay
  # added to the gradient, as PyTorch's SGD) or 'adamw' (decoupled decay).
  config.optimizer = 'lamb'
  config.momentum = 0.9
  # MixUp / CutMix Beta(alpha, alpha) (0: off; both on: one per batch, p=.5);
  # mix_prob: probability that a batch is mixed at all.
  config.mixup_alpha = 0.0
  config.cutmix_alpha = 0.0
  config.mix_prob = 1.0
  # RandAugment: ops per image (0: off) and magnitude on timm's 0..10 scale.
  config.randaugment_num_ops = 0
  config.randaugment_magnitude = 9.0
  # EMA of the weights, used for validation and test; 0: off.
  config.ema_decay = 0.0
  # ---- End of recipe options. ----
  return config
