"""Cortex stage 'pretrain_stage0' (settings: utils.py). Run: python3 train_pretrain_stage0.py, or on GPUs: smart_train train_pretrain_stage0.py --include localhost:0,1"""
from utils import train

if __name__ == "__main__":
    train("pretrain_stage0")
