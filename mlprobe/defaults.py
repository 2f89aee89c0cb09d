"""Default settings of every stage, kept in one place.

The training defaults follow the reference layover method: SGD with
momentum 0.9, learning rate 0.1, no weight decay, batch size 64, 30 epochs
with cosine annealing over the whole run, seed 0.
"""

# Extraction.
SHARD_SIZE = 1024  # images per HDF5 shard
EXTRACT_BATCH_SIZE = 32
EXTRACT_WORKERS = 2
FEATURE_DTYPE = "float16"  # on disk; training math is float32
VIEWS = 1  # augmented views per training image; 1 stores the single unaugmented view
VIEW_SEED = 0  # base seed of the augmented views
RANDAUGMENT_NUM_OPS = 2  # RandAugment operations per view (torchvision's default)
RANDAUGMENT_MAGNITUDE = 9  # RandAugment strength, 0..30 (torchvision's default)
CUTOUT_FACTOR = 0.5  # side of the Cutout hole as a fraction of the image side
TRAINING_SPLIT_NAMES = ("train", "trainval")  # splits that get augmented views unless the caller overrides it
DISTRIBUTED_TIMEOUT_S = 24 * 3600  # how long a rank that finished early waits at the final barrier

# Probing.
EPOCHS = 30
BATCH_SIZE = 64
LEARNING_RATE = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 0.0
SEED = 0
VAL_FRACTION = 0.1  # share of the training split held out for choosing epoch and lr
SPLIT_SEED = 0  # seed of the train/validation split, fixed across heads
THRESHOLD = 0.5  # sigmoid probability above which a label is predicted
TOP_K = 3  # labels predicted per image for the top-k metrics

# Demo data and backbone.
DEMO_MODEL = "tf_efficientnet_lite0"
DEMO_IMAGE_SIZE = 128
DEMO_TRAIN_IMAGES = 1200
DEMO_TEST_IMAGES = 600
DEMO_SEED = 0

# Default probe sweep: every head kind at every stage, over learning rates,
# weight decays and feature normalisations. The reference settings (lr 0.1,
# no weight decay, no normalisation) are one point of it.
SWEEP_HEADS = ("linear", "layover", "concat", "all-stages")
SWEEP_SEEDS = (0,)
SWEEP_LEARNING_RATES = (0.1, 0.01, 0.001)
SWEEP_WEIGHT_DECAYS = (0.0, 1e-4)
SWEEP_NORMALIZATIONS = ("none", "standardize", "l2")

# Splits used for training and testing, per dataset.
TRAIN_TEST_SPLITS = {
    "voc2007": ("trainval", "test"),
    "coco2014": ("train", "val"),
    "coco2017": ("train", "val"),
    "csv": ("train", "test"),
}
FEATURES_ROOT = "runs/features"
DEMO_CELL = 32  # pixels per side of one mosaic cell; demo images are 2x2 cells

# Dataset download.
DOWNLOAD_CONNECT_TIMEOUT = 5.0  # seconds to resolve and connect to an archive host before giving up
DOWNLOAD_READ_TIMEOUT = 60.0  # seconds without data before a running download fails (it resumes on rerun)

# Backbone weights and feature store.
HUB_CONNECT_TIMEOUT = 3.0  # seconds to resolve and connect to the weight host before failing offline
STORE_SCHEMA_VERSION = 1  # version of manifest.json and the shard layout
SHARD_COMPRESSION = None  # HDF5 filter for feature datasets: None, "gzip" or "lzf"
MAX_IMAGE_PIXELS = 2**30  # largest image accepted (width * height); Pillow's own limit is about 89.5 million
LARGE_IMAGE_PIXELS = 4096 * 4096  # JPEGs above this size are decoded at reduced scale (Pillow draft mode)
