"""A stack of gated deltas with each gate's thresholds raised until N corpus tokens (after the gate's own
negatives) are exactly closed, capped at CAP, scored as bench stack scores a composition (diagnostic for
docs/scale.md; N = 0: the deltas as stored).

    python bench/gate_threshold_stack.py K N CAP     e.g. 300 32768 0.7
"""
import sys, json, time, torch
sys.path.insert(0,'.')
from bench.gate_threshold import gate_of, with_thresholds, closing_low
from romeflow.engine import gated
from romeflow.engine.gated import slope
from romeflow.engine.models import load_model
from romeflow.engine.statistics import token_rows, wikipedia_corpus
from romeflow.evaluation.datasets import load_counterfact
from romeflow.evaluation.stackbench import score_rows, summarise
from romeflow.pipeline.deltas import load_delta
from romeflow.pipeline.compose import EditedModel
torch.set_num_threads(1)
K=int(sys.argv[1]); N=int(sys.argv[2]); CAP=float(sys.argv[3])
folder='reports/bench/stack-dev300-gated'
run=json.load(open(folder+'/run.json'))
recs=load_counterfact(run['dataset']['path'])
records=recs[:K]; others=[r for r in recs if r.case_id in set(run['others'])]
lm=load_model('gemma-3-270m')
rows=list(token_rows(lm, wikipedia_corpus(), gated.TEXT_TOKENS+N, 256)); x_cal=gated.text_inputs(lm,3,rows[8:]) if N else None
deltas=[]
for r in records:
    d=load_delta(f'{folder}/deltas/{r.case_id}.safetensors')
    if N:
        up,m=d.updates[0],d.meta['edits'][0]; g=gate_of(up,m['gate'],True)
        need=closing_low(g,x_cal,0); dd=max(0,min(need,CAP)-g.low)
        if dd>0:
            delta=up.down[:,0]*g.beta*(g.high-g.low)
            gp=with_thresholds(g,g.low+dd,g.high+dd); gp.beta=slope(lm.model,3,gp.high)
            d.updates[0]=gp.update(up.module,3,delta)
    deltas.append(d)
em=EditedModel(lm); em.compose(deltas, None)
t=time.time(); s=summarise(score_rows(lm,records,others,open('data/heldout.txt').read(),256))
print(K,N,CAP,{k:(round(v['value'],1) if isinstance(v,dict) else v) for k,v in s.items()}, time.time()-t)
