"""Cortex stage 'mix' (settings: utils.py). Run: python3 train_mix.py, or on GPUs: smart_train train_mix.py --include localhost:0,1"""
from utils import train

if __name__ == "__main__":
    train("mix")
