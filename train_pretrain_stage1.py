"""Cortex stage 'pretrain_stage1' (settings: utils.py). Run: python3 train_pretrain_stage1.py, or on GPUs: smart_train train_pretrain_stage1.py --include localhost:0,1"""
from utils import train

if __name__ == "__main__":
    train("pretrain_stage1")
