"""The fine-tuning lab of chapter 09: a tiny pretrained model family, generated tasks, one loop, a grid."""
