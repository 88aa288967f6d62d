//! Issue 5 (part 1): the object history store through the public API. The crash test re-runs this
//! test binary as a writer child and kills it with SIGKILL mid-stream.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use blink::alert::{Image, Survey};
use blink::history::{
    Epoch, EpochStamps, HistoryConfig, HistoryError, HistoryStore, Measurement, MemoryHistory, PutOutcome, RedbHistory,
};
use blink::sim::{simulate_alerts, AlertSimConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("blink-history-it-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Sky centres of the position-only objects of [`crash_epoch`], 1 arcmin apart.
fn centre(k: u64) -> (f64, f64) {
    (150.0 + k as f64 / 60.0, 2.2)
}

/// Epoch `i` of the crash test, a pure function of (seed, i) so the parent can rebuild what the
/// child wrote: 31x31 planes of random pixels, 13 objects by id and 4 by position.
fn crash_epoch(seed: u64, i: u64) -> Epoch {
    let mut rng = StdRng::seed_from_u64(seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut plane = |w: usize| Image::new(w, w, (0..w * w).map(|_| rng.gen_range(-100.0f32..100.0)).collect());
    let stamps =
        EpochStamps { difference: plane(31), variance: plane(31), template_variance: plane(31), psf: plane(15) };
    let (object_id, (ra, dec)) = if i.is_multiple_of(3) {
        let (ra, dec) = centre(i % 4);
        (String::new(), (ra + rng.gen_range(-5e-5..5e-5), dec + rng.gen_range(-5e-5..5e-5)))
    } else {
        (format!("K{}", i % 13), (rng.gen_range(0.0..360.0), rng.gen_range(-60.0..60.0)))
    };
    Epoch {
        survey: Survey::Rubin,
        alert_id: i.to_string(),
        object_id,
        band: ["u", "g", "r", "i", "z", "y"][(i % 6) as usize].into(),
        mjd: 60000.0 + i as f64 * 1e-4 + rng.gen_range(0.0..1.0),
        ra,
        dec,
        stamp_x: rng.gen_range(14.0..16.0),
        stamp_y: rng.gen_range(14.0..16.0),
        stamps,
        measurement: Measurement { flux: rng.gen(), flux_err: rng.gen(), score: rng.gen_range(-10.0..10.0) },
    }
}

const CHILD_DIR: &str = "BLINK_HISTORY_CRASH_DIR";
const CHILD_TEST: &str = "history::crash_writer_child";

/// The child half of [`kill_9_during_writes_loses_no_acked_epoch`]: does nothing unless that test
/// started it. Writes epochs start.. one `put` (or one `put_many` of `BATCH`) at a time and prints
/// `acked <alert id>` only after the call returned.
#[test]
fn crash_writer_child() {
    let Ok(dir) = std::env::var(CHILD_DIR) else { return };
    let var = |k: &str| std::env::var(k).unwrap().parse::<u64>().unwrap();
    let (seed, start, batch) =
        (var("BLINK_HISTORY_CRASH_SEED"), var("BLINK_HISTORY_CRASH_START"), var("BLINK_HISTORY_CRASH_BATCH"));
    let store = RedbHistory::open(&HistoryConfig::at(Path::new(&dir).join("h.redb"))).unwrap();
    let mut out = std::io::stdout().lock();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut i = start;
    // Bounded, in case the parent never kills us.
    while std::time::Instant::now() < deadline && i < start + 50_000 {
        let epochs: Vec<Epoch> = (i..i + batch).map(|j| crash_epoch(seed, j)).collect();
        let outcomes = if batch == 1 { vec![store.put(&epochs[0]).unwrap()] } else { store.put_many(&epochs).unwrap() };
        for (e, o) in epochs.iter().zip(outcomes) {
            assert!(matches!(o, PutOutcome::Added { .. }), "{o:?}");
            writeln!(out, "acked {}", e.alert_id).unwrap();
        }
        out.flush().unwrap();
        i += batch;
    }
}

/// Every epoch the store holds, found through the objects the crash epochs can belong to.
fn stored_epochs(s: &dyn HistoryStore) -> Vec<Epoch> {
    let mut keys: Vec<String> =
        (0..13).filter_map(|k| s.find(Survey::Rubin, &format!("K{k}"), 0.0, 0.0).unwrap()).collect();
    keys.extend((0..4).filter_map(|k| s.find(Survey::Rubin, "", centre(k).0, centre(k).1).unwrap()));
    keys.iter().flat_map(|k| s.object(k).unwrap().unwrap().epochs().into_iter().cloned().collect::<Vec<_>>()).collect()
}

#[test]
fn kill_9_during_writes_loses_no_acked_epoch() {
    let dir = temp_dir("crash");
    let path = dir.join("h.redb");
    let seed = crate::common::seed("kill -9 test");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut acked_all: Vec<u64> = Vec::new();
    let mut written: Vec<std::ops::Range<u64>> = Vec::new();
    // Two crashes on the same file at different points: single puts, then batches of 4.
    for (round, (start, batch, kill_after)) in
        [(0u64, 1u64, rng.gen_range(5..40)), (10_000, 4, rng.gen_range(40..160))].into_iter().enumerate()
    {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([CHILD_TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR, &dir)
            .env("BLINK_HISTORY_CRASH_SEED", seed.to_string())
            .env("BLINK_HISTORY_CRASH_START", start.to_string())
            .env("BLINK_HISTORY_CRASH_BATCH", batch.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut acked = Vec::new();
        while acked.len() < kill_after {
            let line = lines.next().expect("child stopped before being killed").unwrap();
            // The harness's "test <name> ... " (no newline) may lead the first ack's line.
            if let Some((_, id)) = line.split_once("acked ") {
                acked.push(id.parse::<u64>().unwrap());
            }
        }
        // SIGKILL while it keeps writing: no chance to flush or close anything.
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(!status.success(), "round {round}: child exited by itself ({status})");
        assert_eq!(acked, (start..start + kill_after as u64).collect::<Vec<_>>(), "round {round}");
        acked_all.extend(&acked);

        let store = RedbHistory::open(&HistoryConfig::at(&path)).expect("the file opens after kill -9");
        let mut stored = stored_epochs(&store);
        stored.sort_by_key(|e| e.alert_id.parse::<u64>().unwrap());
        let ids: Vec<u64> = stored.iter().map(|e| e.alert_id.parse().unwrap()).collect();
        // Commits land in order and batches whole: this round added start..end, end ≥ what was
        // acked, a whole number of batches.
        let end = ids.iter().copied().filter(|i| *i >= start).max().map_or(start, |i| i + 1);
        assert!(end >= start + kill_after as u64 && (end - start) % batch == 0, "round {round}: {kill_after} acked from {start}, stored up to {end}");
        written.push(start..end);
        let want: Vec<u64> = written.iter().flat_map(|r| r.clone()).collect();
        assert_eq!(ids, want, "round {round}: stored ids are exactly the committed prefix of each round");
        for a in &acked_all {
            assert!(ids.binary_search(a).is_ok(), "round {round}: acked alert {a} missing");
        }
        // Intact, bit for bit, and nothing partial: every stored epoch is the one the child wrote.
        for e in &stored {
            assert_eq!(*e, crash_epoch(seed, e.alert_id.parse().unwrap()), "round {round}: alert {}", e.alert_id);
        }
        let st = store.stats().unwrap();
        let objects: std::collections::BTreeSet<(bool, u64)> =
            ids.iter().map(|i| if i % 3 == 0 { (false, i % 4) } else { (true, i % 13) }).collect();
        assert_eq!((st.epochs as usize, st.objects as usize), (stored.len(), objects.len()), "round {round}");
        eprintln!("round {round}: killed after {} acks; {} epochs committed this round", acked.len(), end - start);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn corrupt_file_is_a_named_error_and_rebuild_keeps_it_aside() {
    let dir = temp_dir("corrupt");
    let path = dir.join("history.redb");
    let mut rng = crate::common::seeded("corrupt file test");
    let junk: Vec<u8> = (0..4096).map(|_| rng.gen()).collect();
    std::fs::write(&path, &junk).unwrap();
    let err = RedbHistory::open(&HistoryConfig::at(&path)).unwrap_err();
    assert!(matches!(err, HistoryError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
    let cfg = HistoryConfig { rebuild_corrupt: true, ..HistoryConfig::at(&path) };
    let store = RedbHistory::open(&cfg).unwrap();
    let aside = store.moved_aside().expect("moved aside").to_owned();
    assert_eq!(std::fs::read(&aside).unwrap(), junk);
    let e = crash_epoch(rng.gen(), 1);
    assert!(matches!(store.put(&e).unwrap(), PutOutcome::Added { new_object: true, .. }));
    drop(store);
    // The rebuilt file is a good store: a plain open works and has the epoch.
    let store = RedbHistory::open(&HistoryConfig::at(&path)).unwrap();
    assert!(store.moved_aside().is_none());
    assert_eq!(stored_epochs(&store), vec![e]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Simulated alerts through `Epoch::from_alert` into both stores behind `Arc<dyn HistoryStore>`:
/// one object per survey object id, the alert's fields kept, redelivery a duplicate.
#[test]
fn simulated_alerts_go_in_by_object_id_on_both_stores() {
    let dir = temp_dir("sim");
    let cfg = HistoryConfig::at(dir.join("h.redb"));
    let stores: Vec<Arc<dyn HistoryStore>> =
        vec![Arc::new(MemoryHistory::new(&cfg).unwrap()), Arc::new(RedbHistory::open(&cfg).unwrap())];
    let alerts = simulate_alerts(6, crate::common::seed("simulated alerts test"), &AlertSimConfig { size: 21, ..Default::default() });
    for s in &stores {
        let epochs: Vec<Epoch> = alerts
            .iter()
            .map(|a| {
                let t = &a.triplet;
                let diff: Vec<f32> =
                    t.science.image.data.iter().zip(&t.template.image.data).map(|(s, t)| s - t).collect();
                let var = t.science.variance.clone().unwrap_or_else(|| Image::zeros(21, 21));
                let stamps = EpochStamps {
                    difference: Image::new(21, 21, diff),
                    variance: var.clone(),
                    template_variance: t.template.variance.clone().unwrap_or(var),
                    psf: blink::sim::gaussian_image(7, 7, 3.0, 3.0, 1.5),
                };
                Epoch::from_alert(a, stamps, Measurement { flux: 1.0, flux_err: 0.5, score: 2.0 })
            })
            .collect();
        let out = s.put_many(&epochs).unwrap();
        assert!(out.iter().all(|o| matches!(o, PutOutcome::Added { new_object: true, .. })), "{out:?}");
        assert!(matches!(s.put(&epochs[3]).unwrap(), PutOutcome::Duplicate { .. }));
        for (a, e) in alerts.iter().zip(&epochs) {
            let key = s.find(a.survey, &a.object_id, a.ra, a.dec).unwrap().unwrap();
            assert_eq!(key, format!("{}:id:{}", a.survey, a.object_id));
            let h = s.object(&key).unwrap().unwrap();
            assert_eq!((h.epochs(), h.ra, h.dec), (vec![e], a.ra, a.dec));
            assert_eq!((e.mjd, e.stamp_x, e.band.as_str()), (a.mjd_tai, a.candidate.stamp_x, a.band.as_str()));
        }
        let st = s.stats().unwrap();
        assert_eq!((st.objects, st.epochs, st.duplicates), (6, 6, 1));
    }
    drop(stores);
    let _ = std::fs::remove_dir_all(&dir);
}
