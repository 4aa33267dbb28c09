from django.db import models


class Item(models.Model):
    worker = models.IntegerField()
    n = models.IntegerField()
