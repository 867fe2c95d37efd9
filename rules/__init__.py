"""The shipped rule files, installed as package data (`fxsurgery.rules`)."""
