"""Reading the input: finding files and their identities (`files`), splitting big files into
row-range shards (`sharding`), reading a shard into normalised rows (`readers`)."""
