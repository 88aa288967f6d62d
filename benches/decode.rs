//! Decoder benchmark: alerts per second for each wire format blink reads, on the real fixtures
//! as Kafka carries them (`source::replay::fixture_messages`): one ZTF container per alert (ZTF
//! and Fink-enriched, deflate/snappy/null codecs, gzipped FITS cutouts), the 7 real Rubin alerts
//! Confluent-framed; and blink-native alerts (63×63 simulated cutouts, one container each). The
//! official fake Rubin alerts are left out: their cutouts are null, so they only measure how
//! fast a dead letter is made. Messages are built outside the timed loop.
//!
//! Two groups: `decode` (bytes → `Alert`) and `decode_prepare` (plus the stamp preparation the
//! pipeline's decode stage also does: variance, PSF widths, profile).

use blink::decode::{encode_native, Decoder};
use blink::engine::{prepare_stamp, PrepareConfig};
use blink::sim::{simulate_alerts, AlertSimConfig};
use blink::source::replay::{fixture_messages, FINK_RUBIN};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// (name, messages, alerts they hold).
fn sets(decoder: &Decoder) -> Vec<(&'static str, Vec<Vec<u8>>, u64)> {
    let fixtures = fixture_messages(decoder).expect("fixture messages");
    let ztf: Vec<Vec<u8>> =
        fixtures.iter().filter(|m| m.origin.starts_with("ztf/")).map(|m| m.payload.clone()).collect();
    let rubin: Vec<Vec<u8>> =
        fixtures.iter().filter(|m| m.origin == FINK_RUBIN.0).map(|m| m.payload.clone()).collect();
    let native: Vec<Vec<u8>> = simulate_alerts(64, 7, &AlertSimConfig::default())
        .iter()
        .map(|a| encode_native(std::slice::from_ref(a)).expect("native encoding"))
        .collect();
    [("ztf", ztf), ("rubin", rubin), ("native", native)]
        .into_iter()
        .map(|(name, msgs)| {
            // Count what decodes, so the throughput is in alerts, and no failure hides in it.
            let mut alerts = 0u64;
            for m in &msgs {
                for r in decoder.decode_message(m) {
                    r.unwrap_or_else(|e| panic!("{name} fixture does not decode: {e}"));
                    alerts += 1;
                }
            }
            eprintln!("{name}: {} messages, {alerts} alerts", msgs.len());
            (name, msgs, alerts)
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let decoder = Decoder::new(Default::default()).expect("decoder");
    let sets = sets(&decoder);
    let prep = PrepareConfig::default();

    let mut group = c.benchmark_group("decode");
    group.sample_size(10);
    for (name, msgs, alerts) in &sets {
        group.throughput(Throughput::Elements(*alerts));
        group.bench_function(*name, |b| {
            b.iter(|| msgs.iter().map(|m| decoder.decode_message(m).len()).sum::<usize>())
        });
    }
    group.finish();

    let mut group = c.benchmark_group("decode_prepare");
    group.sample_size(10);
    for (name, msgs, alerts) in &sets {
        group.throughput(Throughput::Elements(*alerts));
        group.bench_function(*name, |b| {
            b.iter(|| {
                msgs.iter()
                    .flat_map(|m| decoder.decode_message(m))
                    .filter_map(Result::ok)
                    .filter(|a| prepare_stamp(a, &prep).is_ok())
                    .count()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
