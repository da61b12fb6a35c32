"""AstroCLIP family: galaxy-image and spectrum towers aligned into one embedding space.

Modules, one job each (the roles every family shares first, then AstroCLIP's own):
- `model`      model config (stage / objective) and the module that ties towers and heads
- `prepare`    native files -> shards: sky cross-match, spectra resampled, targets joined;
               the shuffled-pair control
- `collate`    per-sample preprocessing that runs in loader workers (crops, flips, noise, masks)
- `loss`       InfoNCE with cross-rank negatives, masked-segment reconstruction loss
- `evaluate`   zero-shot k-NN / MLP regression and cross-modal retrieval from embeddings
- `family`     the `Family` glue the trainer and exporter use
- `synth`      a physically motivated synthetic galaxy population (latent properties -> SED)
- `convert`    released PolymathicAI/AstroCLIP checkpoints -> our model directories
- `survey`     observing that population: Sérsic images in g, r, z and DESI-like spectra
- `formats`    Multimodal Universe HDF5 trees and FITS cutouts / spectrum tables (read and write)
- `crossmatch` unique sky matches between sources (astropy SkyCoord)
- `resample`   flux-conserving resampling of spectra onto the model's wavelength grid
- `towers`     the image ViT and the SpecFormer spectrum transformer
- `heads`      attention-pooling heads that project tower tokens into the shared space
"""
