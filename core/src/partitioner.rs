//! Kafka's default partitioner: murmur2 of the key bytes, made positive,
//! modulo the partition count. A key lands where Kafka would put it.

/// Kafka's murmur2 (as `org.apache.kafka.common.utils.Utils.murmur2`),
/// returning the same signed 32-bit value as the Java client.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= (rest[2] as u32) << 16;
    }
    if rest.len() >= 2 {
        h ^= (rest[1] as u32) << 8;
    }
    if !rest.is_empty() {
        h ^= rest[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// Kafka's `toPositive`: clears the sign bit.
pub fn to_positive(n: i32) -> u32 {
    (n as u32) & 0x7fff_ffff
}

/// The partition Kafka's default partitioner picks for `key` among
/// `partitions` partitions (`partitions` must be at least 1).
///
/// ```
/// assert_eq!(conveyor::partitioner::partition_for_key(b"foobar", 50), 16);
/// ```
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    to_positive(murmur2(key)) % partitions.max(1)
}

/// The partition a record goes to (contract §3): its explicit partition;
/// else Kafka's partitioner on its key; else murmur2 of its idempotency
/// key (a retry lands where the first try did); else the next round-robin
/// slot, taken from `round_robin` (which is advanced). Every backend
/// routes with this one function.
///
/// ```
/// use conveyor::{partitioner::route, Record};
/// let mut rr = 0;
/// assert_eq!(route(&Record::new("v").with_partition(2), 4, &mut rr), 2);
/// assert_eq!(route(&Record::new("v").with_key("foobar"), 50, &mut rr), 16);
/// assert_eq!((route(&Record::new("a"), 4, &mut rr), route(&Record::new("b"), 4, &mut rr)), (0, 1));
/// ```
pub fn route(record: &crate::Record, partitions: u32, round_robin: &mut u32) -> u32 {
    match (record.partition, &record.key, &record.idempotency_key) {
        (Some(p), _, _) => p,
        (None, Some(key), _) => partition_for_key(key, partitions),
        (None, None, Some(id)) => partition_for_key(id.as_bytes(), partitions),
        (None, None, None) => {
            let p = *round_robin % partitions.max(1);
            *round_robin = round_robin.wrapping_add(1);
            p
        }
    }
}

/// A batch for a topic of `config`: every record checked
/// ([`crate::backend::validate::record`]: partition in range, size, key),
/// then routed with [`route`]; returns the record indexes per partition,
/// in ascending partition order and input order within each. Every
/// server backend plans its sends with this one function.
///
/// # Errors
/// The first record's validation error; nothing is routed then (the
/// round-robin counter does not move).
///
/// ```
/// use conveyor::{partitioner::plan, Record, TopicConfig};
/// let records = vec![Record::new("a").with_partition(1), Record::new("b").with_partition(0)];
/// let plan = plan("t", &records, &TopicConfig::new(2), &mut 0)?;
/// assert_eq!(plan.into_iter().collect::<Vec<_>>(), [(0, vec![1]), (1, vec![0])]);
/// # Ok::<(), conveyor::Error>(())
/// ```
pub fn plan(
    topic: &str,
    records: &[crate::Record],
    config: &crate::TopicConfig,
    round_robin: &mut u32,
) -> crate::Result<std::collections::BTreeMap<u32, Vec<usize>>> {
    for r in records {
        crate::validate::record(topic, r, config.partitions, config.max_message_bytes)?;
    }
    let mut by_partition: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
    for (i, r) in records.iter().enumerate() {
        by_partition
            .entry(route(r, config.partitions, round_robin))
            .or_default()
            .push(i);
    }
    Ok(by_partition)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Apache Kafka's `UtilsTest.testMurmur2` vectors.
    #[test]
    fn murmur2_matches_kafka_vectors() {
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (key, want) in cases {
            assert_eq!(murmur2(key), want, "{}", String::from_utf8_lossy(key));
        }
    }

    #[test]
    fn to_positive_clears_sign_bit_only() {
        assert_eq!(to_positive(-790_332_482), 1_357_151_166);
        assert_eq!(to_positive(5), 5);
        assert_eq!(to_positive(i32::MIN), 0);
    }

    #[test]
    fn partition_is_positive_hash_modulo_count() {
        assert_eq!(partition_for_key(b"foobar", 50), 1_357_151_166 % 50);
        assert_eq!(partition_for_key(b"anything", 1), 0);
    }
}
