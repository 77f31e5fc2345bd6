"""Container images the components run in on a cluster (built from images/Dockerfile*)."""

# The CPU image holds the project with all extras; the training image adds CUDA torch.
BASE_IMAGE = "ghcr.io/stratarec/stratarec:0.1.0"
TRAIN_IMAGE = "ghcr.io/stratarec/stratarec-train:0.1.0-cuda12"
