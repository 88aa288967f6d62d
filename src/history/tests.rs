//! Behaviour of both stores: each check runs on [`MemoryHistory`] and on [`RedbHistory`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::sky::{self, INDEX_DEPTH};
use super::*;

/// A fresh folder under the system temp dir, removed on drop.
pub(crate) struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "blink-history-{}-{name}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rng() -> StdRng {
    crate::testing::rng()
}

type Named = (&'static str, Box<dyn HistoryStore>);

/// Both stores under `cfg` (the redb one in a fresh folder, kept alive by the returned guard).
fn stores(cfg: &HistoryConfig) -> (Vec<Named>, TempDir) {
    let dir = TempDir::new("unit");
    let disk = HistoryConfig { path: dir.0.join("h.redb"), ..cfg.clone() };
    let v: Vec<Named> = vec![
        ("memory", Box::new(MemoryHistory::new(cfg).unwrap())),
        ("redb", Box::new(RedbHistory::open(&disk).unwrap())),
    ];
    (v, dir)
}

/// A small valid epoch at a position, random pixels; fixed-length ids so every record of one
/// survey has the same size.
fn epoch(rng: &mut impl Rng, alert: u64, object_id: &str, ra: f64, dec: f64, mjd: f64) -> Epoch {
    let plane = |rng: &mut dyn rand::RngCore, w: usize| {
        Image::new(w, w, (0..w * w).map(|_| rng.gen_range(-10.0f32..10.0)).collect())
    };
    Epoch {
        survey: Survey::Ztf,
        alert_id: format!("{alert:012}"),
        object_id: object_id.to_owned(),
        band: ["g", "r"][rng.gen_range(0..2)].into(),
        mjd,
        ra,
        dec,
        stamp_x: rng.gen_range(0.0..7.0),
        stamp_y: rng.gen_range(0.0..7.0),
        stamps: EpochStamps {
            difference: plane(rng, 7),
            variance: plane(rng, 7),
            template_variance: plane(rng, 7),
            psf: plane(rng, 3),
        },
        measurement: Measurement { flux: rng.gen(), flux_err: rng.gen(), score: rng.gen() },
    }
}

/// A point `arcsec` away from (ra, dec) towards position angle `pa` (radians), small-angle.
fn offset(ra: f64, dec: f64, arcsec: f64, pa: f64) -> (f64, f64) {
    let d = arcsec / 3600.0;
    (ra + d * pa.sin() / dec.to_radians().cos(), dec + d * pa.cos())
}

fn arcsec_between(a: (f64, f64), b: (f64, f64)) -> f64 {
    sky::distance_rad(a.0, a.1, b.0, b.1).to_degrees() * 3600.0
}

fn added(o: PutOutcome) -> (String, bool) {
    match o {
        PutOutcome::Added { object, new_object } => (object, new_object),
        other => panic!("expected Added, got {other:?}"),
    }
}

fn random_sky(rng: &mut impl Rng) -> (f64, f64) {
    (rng.gen_range(0.0..360.0), rng.gen_range(-80.0..80.0))
}

#[test]
fn match_by_survey_object_id_wherever_the_alert_is() {
    let mut rng = rng();
    let (stores, _dir) = stores(&HistoryConfig::default());
    for (name, s) in &stores {
        let (ra, dec) = random_sky(&mut rng);
        let (k1, new1) = added(s.put(&epoch(&mut rng, 1, "ZTF21aaaaaaa", ra, dec, 60000.0)).unwrap());
        // Far away on the sky, same id: same object (the survey's association wins).
        let (k2, new2) = added(s.put(&epoch(&mut rng, 2, "ZTF21aaaaaaa", ra, dec + 0.5, 60001.0)).unwrap());
        let (k3, new3) = added(s.put(&epoch(&mut rng, 3, "ZTF21bbbbbbb", ra, dec, 60002.0)).unwrap());
        assert_eq!((k1.as_str(), new1, new2, new3), ("ztf:id:ZTF21aaaaaaa", true, false, true), "{name}");
        assert_eq!(k1, k2, "{name}");
        assert_ne!(k1, k3, "{name}");
        assert_eq!(s.find(Survey::Ztf, "ZTF21aaaaaaa", 0.0, 0.0).unwrap(), Some(k1.clone()), "{name}");
        assert_eq!(s.find(Survey::Rubin, "ZTF21aaaaaaa", ra, dec).unwrap(), None, "{name}: surveys apart");
        let h = s.object(&k1).unwrap().unwrap();
        assert_eq!((h.len(), h.object_id.as_str(), h.ra, h.dec), (2, "ZTF21aaaaaaa", ra, dec), "{name}");
        assert_eq!(s.stats().unwrap().objects, 2, "{name}");
    }
}

/// Alerts around a random cell corner of the index (up to four cells meet there), all within the
/// radius of the first: one object.
#[test]
fn match_by_position_across_cell_edges() {
    let mut rng = rng();
    let (stores, _dir) = stores(&HistoryConfig::default());
    for (name, s) in &stores {
        for round in 0..20u64 {
            let corner = loop {
                let c = rng.gen_range(0..cdshealpix::nested::n_hash(INDEX_DEPTH));
                let (l, b) = cdshealpix::nested::vertices(INDEX_DEPTH, c)[rng.gen_range(0..4)];
                if b.to_degrees().abs() < 85.0 {
                    break (l.to_degrees(), b.to_degrees());
                }
            };
            // Six points 0.45 arcsec from the corner, 60° apart: they fall in at least two of the
            // cells that meet there, and any two are < 1 arcsec apart.
            let pa0 = rng.gen_range(0.0..std::f64::consts::TAU);
            let points: Vec<(f64, f64)> = (0..6)
                .map(|k| offset(corner.0, corner.1, 0.45, pa0 + k as f64 * std::f64::consts::FRAC_PI_3))
                .collect();
            let cells: std::collections::BTreeSet<u64> =
                points.iter().map(|p| sky::cell(INDEX_DEPTH, p.0, p.1)).collect();
            assert!(cells.len() >= 2, "{name}: {points:?} around a corner all in {cells:?}");
            let mut key = None;
            for (i, p) in points.iter().enumerate() {
                assert!(arcsec_between(points[0], *p) < 1.0);
                let (k, new) =
                    added(s.put(&epoch(&mut rng, 1000 * round + i as u64, "", p.0, p.1, 60000.0 + i as f64)).unwrap());
                assert_eq!(new, i == 0, "{name}: point {i} of {points:?} in cells {cells:?}");
                assert_eq!(*key.get_or_insert(k.clone()), k, "{name}");
            }
            assert!(key.unwrap().starts_with("ztf:hpx29:"));
        }
        assert_eq!(s.stats().unwrap().objects, 20, "{name}");
    }
}

#[test]
fn no_match_beyond_the_radius_and_nearest_wins() {
    let mut rng = rng();
    for radius in [1.0, 2.5] {
        let cfg = HistoryConfig { match_radius_arcsec: radius, ..Default::default() };
        let (stores, _dir) = stores(&cfg);
        for (name, s) in &stores {
            let a = random_sky(&mut rng);
            let pa = rng.gen_range(0.0..std::f64::consts::TAU);
            let (ka, _) = added(s.put(&epoch(&mut rng, 1, "", a.0, a.1, 60000.0)).unwrap());
            // Just outside the radius: a new object.
            let b = offset(a.0, a.1, radius * 1.05, pa);
            let (kb, new_b) = added(s.put(&epoch(&mut rng, 2, "", b.0, b.1, 60000.0)).unwrap());
            assert!(new_b && ka != kb, "{name}: {} arcsec away with radius {radius}", arcsec_between(a, b));
            // Between the two, nearer to b: joins b.
            let c = offset(a.0, a.1, radius * 0.6, pa);
            assert!(arcsec_between(c, a) <= radius && arcsec_between(c, b) < arcsec_between(c, a));
            let (kc, new_c) = added(s.put(&epoch(&mut rng, 3, "", c.0, c.1, 60000.0)).unwrap());
            assert_eq!((kc.as_str(), new_c), (kb.as_str(), false), "{name}");
            assert_eq!(s.find(Survey::Ztf, "", a.0, a.1).unwrap(), Some(ka), "{name}");
            let far = offset(a.0, a.1, radius * 3.0, pa + std::f64::consts::PI);
            assert_eq!(s.find(Survey::Ztf, "", far.0, far.1).unwrap(), None, "{name}");
        }
    }
}

#[test]
fn duplicate_alert_changes_nothing_and_queries_sort_by_mjd() {
    let mut rng = rng();
    let (stores, _dir) = stores(&HistoryConfig::default());
    for (name, s) in &stores {
        let (ra, dec) = random_sky(&mut rng);
        let mut epochs: Vec<Epoch> = (0..12)
            .map(|i| {
                let mjd = 60000.0 + rng.gen_range(0.0..30.0);
                epoch(&mut rng, i, "obj", ra, dec, mjd)
            })
            .collect();
        for e in &epochs {
            s.put(e).unwrap();
        }
        let before = (s.stats().unwrap(), s.object("ztf:id:obj").unwrap());
        // Redelivered with other pixels: still a duplicate (the alert id decides), nothing changes.
        let mut again = epochs[rng.gen_range(0..12)].clone();
        again.stamps.difference.data[0] += 1.0;
        assert_eq!(s.put(&again).unwrap(), PutOutcome::Duplicate { object: "ztf:id:obj".into() }, "{name}");
        let after = (s.stats().unwrap(), s.object("ztf:id:obj").unwrap());
        assert_eq!(after.1, before.1, "{name}");
        assert_eq!(after.0, HistoryStats { duplicates: 1, ..before.0 }, "{name}");
        let h = after.1.unwrap();
        epochs.sort_by(|a, b| a.mjd.total_cmp(&b.mjd));
        assert_eq!(h.epochs().into_iter().cloned().collect::<Vec<_>>(), epochs, "{name}");
        for (band, list) in &h.bands {
            assert!(list.windows(2).all(|w| w[0].mjd <= w[1].mjd) && list.iter().all(|e| &e.band == band));
        }
    }
}

#[test]
fn retention_by_age_keeps_exactly_the_window_before_the_newest() {
    let mut rng = rng();
    let cfg = HistoryConfig { retention_days: rng.gen_range(5.0..20.0), ..Default::default() };
    let (stores, _dir) = stores(&cfg);
    let (ra, dec) = random_sky(&mut rng);
    let epochs: Vec<Epoch> = (0..40)
        .map(|i| {
            let mjd = 60000.0 + rng.gen_range(0.0..60.0);
            epoch(&mut rng, i, &format!("o{}", i % 4), ra, dec, mjd)
        })
        .collect();
    // What the rules say: expired on arrival if older than the window before the newest so far.
    let mut newest = f64::MIN;
    let mut expired = 0;
    for e in &epochs {
        if e.mjd < newest - cfg.retention_days {
            expired += 1;
        }
        newest = newest.max(e.mjd);
    }
    let keep: Vec<&Epoch> = epochs.iter().filter(|e| e.mjd >= newest - cfg.retention_days).collect();
    for (name, s) in &stores {
        for e in &epochs {
            let o = s.put(e).unwrap();
            assert!(matches!(o, PutOutcome::Added { .. } | PutOutcome::Expired), "{name}: {o:?}");
        }
        let st = s.stats().unwrap();
        assert_eq!(st.epochs as usize, keep.len(), "{name}");
        assert_eq!(st.expired_on_arrival, expired, "{name}");
        assert_eq!((st.evicted_by_age + st.expired_on_arrival) as usize, epochs.len() - keep.len(), "{name}");
        assert_eq!(st.evicted_by_size, 0);
        assert_eq!(st.newest_mjd, Some(newest));
        let mut stored: Vec<String> = (0..4)
            .filter_map(|o| s.object(&format!("ztf:id:o{o}")).unwrap())
            .flat_map(|h| h.epochs().into_iter().map(|e| e.alert_id.clone()).collect::<Vec<_>>())
            .collect();
        stored.sort();
        let mut want: Vec<String> = keep.iter().map(|e| e.alert_id.clone()).collect();
        want.sort();
        assert_eq!(stored, want, "{name}");
        assert_eq!(
            st.objects as usize,
            (0..4).filter(|o| s.object(&format!("ztf:id:o{o}")).unwrap().is_some()).count()
        );
    }
}

#[test]
fn size_bound_evicts_oldest_first_and_counts() {
    let mut rng = rng();
    let (ra, dec) = random_sky(&mut rng);
    let epochs: Vec<Epoch> = (0..30)
        .map(|i| {
            let mjd = 60000.0 + rng.gen_range(0.0..30.0);
            epoch(&mut rng, i, &format!("o{}", i % 5), ra, dec, mjd)
        })
        .collect();
    let one = super::record::encode_epoch("ztf:id:o0", &epochs[0]).len() as u64;
    let keep = rng.gen_range(3..10);
    let cfg = HistoryConfig { max_bytes: one * keep + one / 2, ..Default::default() };
    let (stores, _dir) = stores(&cfg);
    for (name, s) in &stores {
        // Batches of random sizes: eviction runs after every epoch, inside the batch.
        let mut rest = &epochs[..];
        while !rest.is_empty() {
            let (batch, tail) = rest.split_at(rng.gen_range(1..=rest.len().min(6)));
            s.put_many(batch).unwrap();
            rest = tail;
        }
        let st = s.stats().unwrap();
        assert_eq!(
            (st.epochs, st.bytes, st.evicted_by_size, st.evicted_by_age),
            (keep, keep * one, 30 - keep, 0),
            "{name}"
        );
        let mut newest: Vec<&Epoch> = epochs.iter().collect();
        newest.sort_by(|a, b| b.mjd.total_cmp(&a.mjd));
        for (i, e) in newest.iter().enumerate() {
            let h = s.object(&format!("ztf:id:{}", e.object_id)).unwrap();
            let present = h.is_some_and(|h| h.epochs().iter().any(|x| x.alert_id == e.alert_id));
            assert_eq!(present, (i as u64) < keep, "{name}: epoch {i} by age");
        }
    }
}

#[test]
fn bad_epochs_are_rejected_not_errors() {
    let mut rng = rng();
    let (stores, _dir) = stores(&HistoryConfig::default());
    for (name, s) in &stores {
        let good = epoch(&mut rng, 1, "a", 10.0, 10.0, 60000.0);
        let mut bad = epoch(&mut rng, 2, "a", 10.0, 10.0, 60000.0);
        bad.stamps.psf = Image::zeros(4, 4);
        let out = s.put_many(&[bad, good]).unwrap();
        assert!(
            matches!(&out[0], PutOutcome::Rejected(r) if r.contains("psf") && r.contains("000000000002")),
            "{name}: {out:?}"
        );
        assert!(matches!(&out[1], PutOutcome::Added { .. }), "{name}");
        assert_eq!(s.stats().unwrap().epochs, 1);
    }
}

/// One object of the property test: by survey id, or position only.
#[derive(Debug, Clone)]
struct Obj {
    id: String,
    ra: f64,
    dec: f64,
}

fn prop_epochs(seed: u64, n: usize) -> (Vec<Obj>, Vec<(usize, Epoch)>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (ra0, dec0) = random_sky(&mut rng);
    // Six objects 1 arcmin apart; half have a survey id.
    let objs: Vec<Obj> = (0..6)
        .map(|i| {
            let (ra, dec) = offset(ra0, dec0, 60.0 * i as f64, 1.0);
            Obj { id: if i % 2 == 0 { format!("Z{i}") } else { String::new() }, ra, dec }
        })
        .collect();
    let epochs = (0..n)
        .map(|i| {
            let o = rng.gen_range(0..objs.len());
            // Jitter ≤ 0.3 arcsec: any two epochs of an object are within the 1 arcsec radius.
            let (ra, dec) = offset(objs[o].ra, objs[o].dec, rng.gen_range(0.0..0.3), rng.gen_range(0.0..6.3));
            let mjd = 60000.0 + rng.gen_range(0.0..30.0);
            (o, epoch(&mut rng, i as u64, &objs[o].id, ra, dec, mjd))
        })
        .collect();
    (objs, epochs)
}

fn check_order_and_duplicates(
    s: &dyn HistoryStore,
    seed: u64,
    n: usize,
    dups: &[usize],
    batch: usize,
) -> Result<(), TestCaseError> {
    let (objs, epochs) = prop_epochs(seed, n);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut sequence: Vec<Epoch> = epochs.iter().map(|(_, e)| e.clone()).collect();
    sequence.extend(dups.iter().map(|d| epochs[d % n].1.clone()));
    sequence.shuffle(&mut rng);
    let mut outcomes = Vec::new();
    for chunk in sequence.chunks(batch) {
        outcomes.extend(s.put_many(chunk).unwrap());
    }
    let dup_count = outcomes.iter().filter(|o| matches!(o, PutOutcome::Duplicate { .. })).count();
    prop_assert_eq!(dup_count, dups.len());
    let st = s.stats().unwrap();
    prop_assert_eq!((st.epochs as usize, st.duplicates as usize), (n, dups.len()));
    let mut objects_seen = 0;
    for (o, obj) in objs.iter().enumerate() {
        // The deduplicated sequence, sorted by MJD: what the object must hold.
        let mut want: Vec<&Epoch> = epochs.iter().filter(|(i, _)| *i == o).map(|(_, e)| e).collect();
        want.sort_by(|a, b| a.mjd.total_cmp(&b.mjd));
        let key = s.find(Survey::Ztf, &obj.id, obj.ra, obj.dec).unwrap();
        prop_assert_eq!(key.is_some(), !want.is_empty());
        let Some(key) = key else { continue };
        objects_seen += 1;
        let h = s.object(&key).unwrap().unwrap();
        prop_assert_eq!(h.epochs(), want);
    }
    prop_assert_eq!(st.objects, objects_seen);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn memory_random_order_and_duplicates_give_the_deduplicated_sorted_history(
        seed in any::<u64>(), n in 1usize..60, dups in prop::collection::vec(any::<usize>(), 0..30), batch in 1usize..8,
    ) {
        let s = MemoryHistory::new(&HistoryConfig::default()).unwrap();
        check_order_and_duplicates(&s, seed, n, &dups, batch)?;
    }
}

proptest! {
    // Every batch is an fsync'd commit: fewer cases.
    #![proptest_config(ProptestConfig::with_cases(8))]
    #[test]
    fn redb_random_order_and_duplicates_give_the_deduplicated_sorted_history(
        seed in any::<u64>(), n in 1usize..40, dups in prop::collection::vec(any::<usize>(), 0..20), batch in 1usize..8,
    ) {
        let dir = TempDir::new("prop");
        let s = RedbHistory::open(&HistoryConfig::at(dir.0.join("h.redb"))).unwrap();
        check_order_and_duplicates(&s, seed, n, &dups, batch)?;
    }
}

// ---- the redb file: persistence, corruption, rebuild ------------------------------------------

#[test]
fn redb_keeps_everything_across_reopen_and_creates_missing_folders() {
    let mut rng = rng();
    let dir = TempDir::new("reopen");
    let cfg = HistoryConfig::at(dir.0.join("a/b/h.redb"));
    let epochs: Vec<Epoch> = (0..10).map(|i| epoch(&mut rng, i, "", 30.0, 40.0, 60000.0 + i as f64)).collect();
    let (key, stats) = {
        let s = RedbHistory::open(&cfg).unwrap();
        let key = added(s.put_many(&epochs).unwrap().remove(0)).0;
        (key, s.stats().unwrap())
    };
    let s = RedbHistory::open(&cfg).unwrap();
    assert_eq!(s.stats().unwrap(), stats);
    assert_eq!(s.object(&key).unwrap().unwrap().epochs().into_iter().cloned().collect::<Vec<_>>(), epochs);
    assert!(matches!(RedbHistory::open(&cfg), Err(HistoryError::Locked { .. })));
}

#[test]
fn corrupt_or_foreign_files_are_named_errors_and_rebuild_moves_them_aside() {
    let mut rng = rng();
    let dir = TempDir::new("corrupt");
    let path = dir.0.join("h.redb");
    let cfg = HistoryConfig::at(&path);

    // Random bytes.
    let junk: Vec<u8> = (0..rng.gen_range(100..20000)).map(|_| rng.gen()).collect();
    std::fs::write(&path, &junk).unwrap();
    let err = RedbHistory::open(&cfg).unwrap_err();
    assert!(matches!(err, HistoryError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    let s = RedbHistory::open_or_rebuild(&cfg).unwrap();
    let aside = s.moved_aside().unwrap().to_owned();
    assert!(aside.file_name().unwrap().to_str().unwrap().starts_with("h.redb.corrupt-"));
    assert_eq!(std::fs::read(&aside).unwrap(), junk);
    assert_eq!(s.stats().unwrap(), HistoryStats::default());
    s.put(&epoch(&mut rng, 1, "x", 1.0, 2.0, 60000.0)).unwrap();
    drop(s);

    // A real store damaged in place: pages of data overwritten.
    let s = RedbHistory::open(&cfg).unwrap();
    assert!(s.moved_aside().is_none());
    for i in 0..200 {
        s.put(&epoch(&mut rng, 10 + i, &format!("o{i}"), 1.0, 2.0, 60000.0)).unwrap();
    }
    drop(s);
    let mut bytes = std::fs::read(&path).unwrap();
    let len = bytes.len();
    for b in &mut bytes[len / 4..len * 3 / 4] {
        *b = rng.gen();
    }
    std::fs::write(&path, &bytes).unwrap();
    let err = RedbHistory::open(&cfg).unwrap_err();
    assert!(matches!(err, HistoryError::Corrupt { .. }), "{err:?}");
    let s = RedbHistory::open(&HistoryConfig { rebuild_corrupt: true, ..cfg.clone() }).unwrap();
    assert_eq!(std::fs::read(s.moved_aside().unwrap()).unwrap(), bytes);
    assert_eq!(s.stats().unwrap().epochs, 0);
    drop(s);

    // A redb file of something else.
    std::fs::remove_file(&path).unwrap();
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(redb::TableDefinition::<u64, u64>::new("other")).unwrap().insert(1, 2).unwrap();
        txn.commit().unwrap();
    }
    let err = RedbHistory::open(&cfg).unwrap_err();
    assert!(err.to_string().contains("other tables (other)"), "{err}");
}

#[test]
fn a_record_of_an_unknown_version_is_a_clear_error() {
    let mut rng = rng();
    let dir = TempDir::new("version");
    let cfg = HistoryConfig::at(dir.0.join("h.redb"));
    let e = epoch(&mut rng, 77, "v", 1.0, 2.0, 60000.0);
    RedbHistory::open(&cfg).unwrap().put(&e).unwrap();
    {
        use redb::ReadableTable;
        let db = redb::Database::create(&cfg.path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(super::disk::def(super::core::T::Epochs)).unwrap();
            let key = super::record::alert_key(Survey::Ztf, &e.alert_id);
            let mut rec = t.get(&key[..]).unwrap().unwrap().value().to_vec();
            rec[0] = 9;
            t.insert(&key[..], &rec[..]).unwrap();
        }
        txn.commit().unwrap();
    }
    let s = RedbHistory::open(&cfg).unwrap();
    let err = s.object("ztf:id:v").unwrap_err().to_string();
    assert!(err.contains("ztf:000000000077") && err.contains("record version 9, this blink reads version 1"), "{err}");
}

/// Issue 5: stack announcements are upserted per (object, band, window), survive a reopen of
/// the file, and go with the object's last epoch.
#[test]
fn announcements_upsert_survive_reopen_and_go_with_the_object() {
    let mut rng = rng();
    let cfg = HistoryConfig { retention_days: 5.0, ..Default::default() };
    let (stores, dir) = stores(&cfg);
    let a = |band: &str, nights: f64, score: f64| Announcement { band: band.into(), nights, score, mjd: 60000.0 };
    for (name, s) in &stores {
        let key = added(s.put(&epoch(&mut rng, 1, "ZTF1", 10.0, 20.0, 60000.0)).unwrap()).0;
        let other = added(s.put(&epoch(&mut rng, 2, "ZTF2", 10.0, 20.0, 60000.0)).unwrap()).0;
        assert!(s.announcements(&key).unwrap().is_empty(), "{name}");
        s.record_announcements(&[(key.clone(), a("g", 3.0, 6.0)), (key.clone(), a("g", 10.0, 7.0)), (other.clone(), a("r", 3.0, 5.5))]).unwrap();
        s.record_announcements(&[(key.clone(), a("g", 3.0, 9.5))]).unwrap();
        let mut got = s.announcements(&key).unwrap();
        got.sort_by(|x, y| x.nights.total_cmp(&y.nights));
        assert_eq!(got, vec![a("g", 3.0, 9.5), a("g", 10.0, 7.0)], "{name}");
        // A prefix of another key is not that key's.
        assert_eq!(s.announcements(&key[..key.len() - 1]).unwrap(), vec![], "{name}");
        // Both objects' epochs age out: their announcements go too.
        s.put(&epoch(&mut rng, 3, "ZTF3", 10.0, 20.0, 60010.0)).unwrap();
        assert!(s.announcements(&key).unwrap().is_empty() && s.announcements(&other).unwrap().is_empty(), "{name}");
    }
    drop(stores);
    let path = dir.0.join("h.redb");
    let key = {
        let s = RedbHistory::open(&HistoryConfig { path: path.clone(), ..cfg.clone() }).unwrap();
        let key = added(s.put(&epoch(&mut rng, 4, "ZTF4", 10.0, 20.0, 60010.0)).unwrap()).0;
        s.record_announcements(&[(key.clone(), a("i", 30.0, -8.0))]).unwrap();
        key
    };
    let s = RedbHistory::open(&HistoryConfig { path, ..cfg }).unwrap();
    assert_eq!(s.announcements(&key).unwrap(), vec![a("i", 30.0, -8.0)]);
}

#[test]
fn the_replay_log_keeps_the_last_detections_and_never_lowers_the_reservation() {
    let mut rng = rng();
    let (stores, dir) = stores(&HistoryConfig::default());
    for (name, s) in stores {
        let s: std::sync::Arc<dyn HistoryStore> = std::sync::Arc::from(s);
        let log = s.clone().replay_log().expect("both stores have a replay log");
        assert_eq!(log.reserved_sequence().unwrap(), 0, "{name}");
        assert!(log.recent_detections(10).unwrap().is_empty(), "{name}");
        let keep = rng.gen_range(3..20);
        let mut seq = 0u64;
        let mut all = Vec::new();
        for _ in 0..rng.gen_range(5..15) {
            let batch: Vec<(u64, Vec<u8>)> = (0..rng.gen_range(1..6))
                .map(|_| {
                    seq += rng.gen_range(1..4); // gaps, as after a restart
                    (seq, (0..rng.gen_range(0..40)).map(|_| rng.gen()).collect())
                })
                .collect();
            all.extend(batch.clone());
            log.append_detections(&batch, keep).unwrap();
        }
        let want = all[all.len().saturating_sub(keep)..].to_vec();
        assert_eq!(log.recent_detections(keep + 5).unwrap(), want, "{name}: the last {keep}");
        assert_eq!(log.recent_detections(2).unwrap(), want[want.len() - 2..].to_vec(), "{name}");
        log.reserve_sequence(500).unwrap();
        log.reserve_sequence(200).unwrap();
        assert_eq!(log.reserved_sequence().unwrap(), 500, "{name}: never lowered");
        log.append_detections(&[(seq + 1, vec![7])], keep).unwrap();
        assert_eq!(log.reserved_sequence().unwrap(), 500, "{name}: appending keeps it");
    }
    // The redb store keeps it across a reopen.
    let path = dir.0.join("h.redb");
    let s: std::sync::Arc<dyn HistoryStore> = std::sync::Arc::new(RedbHistory::open(&HistoryConfig { path, ..Default::default() }).unwrap());
    let log = s.replay_log().unwrap();
    assert_eq!(log.reserved_sequence().unwrap(), 500);
    assert!(!log.recent_detections(1).unwrap().is_empty());
}
