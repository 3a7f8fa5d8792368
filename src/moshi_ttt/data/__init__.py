"""The data format: the moshi-finetune index, audio and alignments (``files``), sources,
windows, batches and shards (``pipeline``), and a toy dataset (``toy``)."""
