"""Embeddings computed once and shared: by the kit's predictor, training, and the patched tools.

* ``store`` -- the per-slice embedding store (self-contained; copied into the tools it serves).
* ``microsam`` -- micro-sam's ``embedding_path`` zarr written from store entries, with micro-sam's
  own normalisation and signature, so its annotators open it without computing.
* ``precompute`` -- a cohort embedded into the store on a Dask cluster (``medico-adapters precompute``).
* ``lazy`` -- a tool's whole-volume embedding made lazy: each slice embedded when a prompt needs
  it, the rest in the background, through the store (self-contained; ``patch --lazy-embeddings``
  copies it into napari-sam and napari-segment-anything).
"""
